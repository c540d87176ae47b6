//! Chunked transfer pulled by the receiver.
//!
//! Core NATS has no back-pressure, so a large body never travels as a stream
//! pushed at a subscriber. The receiver asks for one range at a time (an
//! idempotent request, safe to repeat), with a few requests in flight, and
//! holds at most `in_flight` chunks in memory whatever the body's size.

use std::future::Future;

use bytes::Bytes;
use futures::{Stream, StreamExt};

use crate::error::{Error, Result};

/// How many chunk requests a receiver keeps in flight.
pub const IN_FLIGHT: usize = 4;

/// Pulls `size` bytes as chunks of at most `chunk` bytes, calling
/// `fetch(offset, length)` for each, with up to `in_flight` calls at once.
/// Chunks come out in order; a chunk shorter than asked is an error, since
/// the size was known up front.
pub fn pull<F, Fut>(
    size: u64,
    chunk: usize,
    in_flight: usize,
    fetch: F,
) -> impl Stream<Item = Result<Bytes>>
where
    F: Fn(u64, usize) -> Fut,
    Fut: Future<Output = Result<Bytes>>,
{
    let chunk = chunk.max(1) as u64;
    let offsets = (0..size.div_ceil(chunk)).map(move |index| {
        let offset = index * chunk;
        (offset, chunk.min(size - offset) as usize)
    });
    futures::stream::iter(offsets)
        .map(move |(offset, length)| {
            let request = fetch(offset, length);
            async move {
                let data = request.await?;
                if data.len() != length {
                    return Err(Error::internal(format!(
                        "chunk at offset {offset}: {} bytes, expected {length}",
                        data.len()
                    )));
                }
                Ok(data)
            }
        })
        .buffered(in_flight.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicUsize, Ordering};

    fn run<F, Fut>(size: u64, chunk: usize, fetch: F) -> Vec<Result<Bytes>>
    where
        F: Fn(u64, usize) -> Fut,
        Fut: Future<Output = Result<Bytes>>,
    {
        futures::executor::block_on(pull(size, chunk, IN_FLIGHT, fetch).collect())
    }

    #[test]
    fn chunks_come_in_order_and_cover_the_body() {
        let body: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        let chunks = run(body.len() as u64, 64, |offset, length| {
            let data = Bytes::copy_from_slice(&body[offset as usize..offset as usize + length]);
            async move { Ok(data) }
        });
        let joined: Vec<u8> = chunks.into_iter().flat_map(|c| c.unwrap()).collect();
        assert_eq!(joined, body);
    }

    #[test]
    fn a_short_chunk_is_an_error() {
        let chunks = run(100, 64, |_, length| async move {
            Ok(Bytes::from(vec![0; length.saturating_sub(1)]))
        });
        let err = chunks[0].as_ref().unwrap_err();
        assert_eq!(err.code, crate::Code::Internal);
        assert!(err.message.contains("expected 64"), "{err}");
    }

    #[test]
    fn at_most_in_flight_requests_run_at_once() {
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let chunks = run(1 << 20, 1024, |_, length| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            let running = &running;
            // Each request is started when the stream asks for it and ends
            // when polled; unbounded, all 1024 would start first.
            async move {
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(Bytes::from(vec![0; length]))
            }
        });
        assert_eq!(chunks.len(), 1024);
        assert!(most.load(Ordering::SeqCst) <= IN_FLIGHT);
    }

    #[test]
    fn an_empty_body_needs_no_request() {
        let chunks = run(0, 64, |_, _| async { panic!("nothing to fetch") });
        assert!(chunks.is_empty());
    }
}
