//! The admin HTTP endpoint, a pingora HTTP service: `/metrics` (Prometheus text
//! format), `/health` (the process is alive) and `/ready` (it can serve: the
//! upstream answers).

use std::sync::Arc;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;

use crate::proxy::state::Proxy;

pub struct AdminHttp {
    pub proxy: Arc<Proxy>,
}

fn text(status: StatusCode, content_type: &str, body: String) -> Response<Vec<u8>> {
    let body = body.into_bytes();
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("content-length", body.len())
        .body(body)
        .unwrap_or_else(|_| Response::new(Vec::new()))
}

#[async_trait]
impl ServeHttp for AdminHttp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        match path.as_str() {
            "/metrics" => text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.proxy.metrics_text(),
            ),
            "/health" => text(StatusCode::OK, "text/plain", "ok\n".into()),
            "/ready" => match self.proxy.readiness().await {
                Ok(()) => text(StatusCode::OK, "text/plain", "ready\n".into()),
                Err(why) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{why}\n"),
                ),
            },
            _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }
}
