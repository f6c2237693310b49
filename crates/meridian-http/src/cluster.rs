//! The one client every node uses to call another node's cluster port.
//!
//! Every call is mutual TLS with this node's certificate to a target whose
//! certificate must match what the caller expects ([`Expect`]); connections
//! are pooled per target. Errors say whether the call can have had an
//! effect, which is what a retry decision needs — never the text of an error.

use crate::pool::{Pool, SendError};
use crate::Body;
use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use meridian_trust::{Expect, Tls};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A node to call: where it listens and who it must be.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Target {
    /// `host:port` of its cluster port.
    pub addr: String,
    pub expect: Expect,
}

impl Target {
    /// From a base URL such as `https://10.0.1.7:7401`.
    pub fn from_url(url: &str, expect: Expect) -> Result<Target, CallError> {
        let uri: http::Uri = url.parse().map_err(|_| CallError::BadTarget(url.to_string()))?;
        match (uri.scheme_str(), uri.authority()) {
            (Some("https"), Some(a)) => Ok(Target { addr: a.to_string(), expect }),
            _ => Err(CallError::BadTarget(url.to_string())),
        }
    }
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0:?} is not a cluster URL (https://host:port)")]
    BadTarget(String),
    /// Nothing was sent (no connection, failed handshake, wrong peer).
    #[error("cannot reach {target}: {reason}")]
    Connect { target: String, reason: String },
    /// Sent, but the connection broke before the whole answer came back.
    #[error("{target} did not finish answering: {reason}")]
    Broken { target: String, reason: String },
    #[error("{target} did not answer within {after:?}")]
    Timeout { target: String, after: Duration },
    #[error("the answer of {target} is larger than {limit} bytes")]
    TooLarge { target: String, limit: usize },
}

impl CallError {
    /// Whether the call certainly had no effect, so it may be sent again
    /// (to the same node or another) even if it is not idempotent.
    pub fn nothing_sent(&self) -> bool {
        matches!(self, CallError::Connect { .. } | CallError::BadTarget(_))
    }
}

/// The answer of a call: status and whole body.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).trim().to_string()
    }
}

/// Cheap to clone: clones share the pools (every app of a node reaches a
/// peer over the same connections).
#[derive(Clone)]
pub struct ClusterClient {
    tls: Arc<Tls>,
    connect_timeout: Duration,
    pools: Arc<Mutex<HashMap<Target, Arc<Pool>>>>,
}

/// Largest answer [`ClusterClient::call`] reads.
pub const MAX_ANSWER: usize = 256 << 20;

impl ClusterClient {
    pub fn new(tls: Arc<Tls>, connect_timeout: Duration) -> ClusterClient {
        ClusterClient { tls, connect_timeout, pools: Default::default() }
    }

    pub fn tls(&self) -> &Arc<Tls> {
        &self.tls
    }

    fn pool(&self, target: &Target) -> Arc<Pool> {
        let mut pools = self.pools.lock().unwrap();
        pools
            .entry(target.clone())
            .or_insert_with(|| {
                Pool::with_tls(target.addr.clone(), self.connect_timeout, self.tls.clone(), target.expect.clone())
            })
            .clone()
    }

    /// Opens connections to `target` ahead of a burst of calls, up to `n`
    /// idle ones (see [`Pool::preconnect`]).
    pub fn preconnect(&self, target: &Target, n: usize) {
        self.pool(target).preconnect(n);
    }

    /// Sends a request (its URI is a path) and returns the response head as
    /// soon as it arrives; the body streams.
    pub async fn send(&self, target: &Target, mut req: Request<Body>) -> Result<Response<Body>, CallError> {
        let name = || format!("{} ({})", target.expect.name, target.addr);
        if let Ok(host) = HeaderValue::from_str(&target.addr) {
            req.headers_mut().insert(http::header::HOST, host);
        }
        self.pool(target).send(req).await.map_err(|e| match e {
            SendError::Connect(reason) => CallError::Connect { target: name(), reason },
            SendError::Request(e) => CallError::Broken { target: name(), reason: e.to_string() },
        })
    }

    /// One whole call: request, status and body, within `timeout`.
    pub async fn call(
        &self,
        target: &Target,
        method: Method,
        path: &str,
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        self.call_with(target, method, path, &[], body, timeout).await
    }

    pub async fn call_with(
        &self,
        target: &Target,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, CallError> {
        let name = || format!("{} ({})", target.expect.name, target.addr);
        let mut b = Request::builder().method(method).uri(path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(crate::full(body)).map_err(|_| CallError::BadTarget(path.to_string()))?;
        let fut = async {
            let resp = self.send(target, req).await?;
            let status = resp.status();
            let body = read_all(resp.into_body(), MAX_ANSWER).await.map_err(|e| match e {
                None => CallError::TooLarge { target: name(), limit: MAX_ANSWER },
                Some(reason) => CallError::Broken { target: name(), reason },
            })?;
            Ok(Answer { status, body })
        };
        tokio::time::timeout(timeout, fut).await.map_err(|_| CallError::Timeout { target: name(), after: timeout })?
    }
}

/// Reads a whole body of at most `limit` bytes (`Err(None)`: too large).
/// Concrete in the body type on purpose: a generic `Into<BoxError>` bound
/// here trips rustc's higher-ranked lifetime inference in callers' futures.
pub async fn read_all(mut body: Body, limit: usize) -> Result<Bytes, Option<String>> {
    use http_body_util::BodyExt;
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| Some(e.to_string()))?;
        if let Ok(d) = frame.into_data() {
            if buf.len() + d.len() > limit {
                return Err(None);
            }
            buf.extend_from_slice(&d);
        }
    }
    Ok(buf.freeze())
}
