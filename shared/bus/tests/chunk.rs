//! 64 MiB pulled through the chunked transfer arrives byte-identical, and
//! the process never holds more than a few chunks of it.
//!
//! A counting allocator tracks the bytes live on the heap of this test
//! process, which holds the receiver and the serving side (the body is made
//! chunk by chunk from its offset, never whole). Receiving into one buffer
//! would put 64 MiB on the heap and fail the bound. This file holds one
//! test, so nothing else allocates while it measures.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_bus::{chunk, subject, Call, Client, Error, Result, Service};
use berth_proto::content::{ReadReply, ReadRequest};
use berth_testkit::NatsServer;
use futures::StreamExt;
use sha2::{Digest, Sha256};

/// The system allocator, counting the bytes live and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged; the
// counters are only arithmetic beside it.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            grew(layout.size());
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        new
    }
}

fn grew(size: usize) {
    let live = LIVE.fetch_add(size, Ordering::Relaxed) + size;
    PEAK.fetch_max(live, Ordering::Relaxed);
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The body's size.
const SIZE: u64 = 64 << 20;

/// The body's bytes from `offset`: a keyed pseudo-random sequence, so a
/// chunk served from the wrong offset or out of order changes the hash.
fn body(offset: u64, length: usize) -> Vec<u8> {
    (offset..offset + length as u64)
        .map(|i| {
            let x = i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i >> 7);
            (x >> 29) as u8
        })
        .collect()
}

/// `read offset len` of the generated body.
async fn read(_: Arc<()>, _: Call, request: ReadRequest) -> Result<ReadReply> {
    let offset = u64::try_from(request.offset).map_err(|_| Error::invalid("negative offset"))?;
    let length = (request.length.max(0) as u64).min(SIZE.saturating_sub(offset)) as usize;
    Ok(ReadReply {
        data: body(offset, length).into(),
        size: SIZE as i64,
    })
}

/// 64 MiB pulled in chunks arrives byte-identical, while the heap never
/// holds more than a small fraction of it.
#[tokio::test]
async fn sixty_four_mib_arrive_intact_in_bounded_memory() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let nats = berth_bus::connect(&server.url(), "chunk-test").await?;
    let _serving = Service::new("content", "0.1.0", Arc::new(()))
        .op("read", read)
        .serve(nats.clone())
        .await?;
    nats.flush().await?;
    let client = Client::new(nats, Duration::from_secs(10));
    let subject = subject::op("default", "content", "read")?;

    // The expected hash, made chunk by chunk too.
    let mut expected = Sha256::new();
    let mut offset = 0;
    while offset < SIZE {
        let length = (1 << 20).min(SIZE - offset) as usize;
        expected.update(body(offset, length));
        offset += length as u64;
    }
    let expected = expected.finalize();

    let chunk_size = client.max_body();
    assert!(chunk_size > 512 << 10, "chunks of {chunk_size} bytes");
    let baseline = LIVE.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);

    let fetch = |offset: u64, length: usize| {
        let request = ReadRequest {
            digest: String::new(),
            offset: offset as i64,
            length: length as i64,
        };
        let client = &client;
        let subject = &subject;
        async move {
            let reply: ReadReply = client.call(subject, &request).await?;
            Ok(reply.data)
        }
    };
    let mut chunks = std::pin::pin!(chunk::pull(SIZE, chunk_size, chunk::IN_FLIGHT, fetch));
    let mut received = Sha256::new();
    let mut total = 0u64;
    let mut count = 0;
    while let Some(data) = chunks.next().await {
        let data = data?;
        total += data.len() as u64;
        count += 1;
        received.update(&data);
    }
    let peak = PEAK.load(Ordering::Relaxed) - baseline;

    assert_eq!(total, SIZE);
    assert_eq!(count, SIZE.div_ceil(chunk_size as u64));
    assert_eq!(received.finalize(), expected, "the body changed on the way");
    // A few chunks in flight, each copied a couple of times on its way
    // through encoding, the socket and decoding: far below the body.
    let bound = (16 << 20) as usize;
    assert!(
        peak < bound,
        "heap peaked {peak} bytes above its baseline, bound {bound}"
    );
    eprintln!("heap peak during the transfer: {peak} bytes, {count} chunks of {chunk_size}");
    Ok(())
}
