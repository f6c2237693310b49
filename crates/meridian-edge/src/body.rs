//! Reading a region's answer into memory when it is small enough to store,
//! without losing it when it is not.

use bytes::{Bytes, BytesMut};
use http_body::{Body as _, Frame};
use meridian_http::{Body, BoxError};
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

pub enum Overflow {
    /// Longer than the limit: the whole body, the part already read first.
    TooLarge(Body),
    /// The body broke off.
    Failed(BoxError),
}

/// The whole body if it is at most `limit` bytes (trailers are dropped: a
/// stored answer has none).
pub async fn buffer_upto(mut body: Body, limit: usize) -> Result<Bytes, Overflow> {
    let mut read: VecDeque<Bytes> = VecDeque::new();
    let mut total = 0usize;
    loop {
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            None => break,
            Some(Err(e)) => return Err(Overflow::Failed(e)),
            Some(Ok(frame)) => {
                let Ok(data) = frame.into_data() else { continue };
                total += data.len();
                read.push_back(data);
                if total > limit {
                    return Err(Overflow::TooLarge(http_body_util::BodyExt::boxed_unsync(Prefixed {
                        read,
                        rest: body,
                    })));
                }
            }
        }
    }
    Ok(match read.len() {
        0 => Bytes::new(),
        1 => read.pop_front().unwrap_or_default(),
        _ => {
            let mut all = BytesMut::with_capacity(total);
            for b in read {
                all.extend_from_slice(&b);
            }
            all.freeze()
        }
    })
}

/// What was already read, then the rest.
struct Prefixed {
    read: VecDeque<Bytes>,
    rest: Body,
}

impl http_body::Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(b) = self.read.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.rest.is_end_stream()
    }
}
