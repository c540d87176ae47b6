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
