//! The operator console at `/ui/`: three static files built into the
//! binary (no JavaScript toolchain, nothing fetched from elsewhere), which
//! read and act through the same `/v1` API and token as every other client.
//!
//! This module only serves the files, with the headers that keep the page
//! safe: a Content-Security-Policy that allows no inline script or style
//! and no other origin, `no-store` so that no cache keeps a page, and no
//! framing. It must not read the store or hold any logic of its own.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const STYLE: &str = include_str!("assets/app.css");

/// No script, style, image or connection from anywhere but this origin, no
/// inline script or style (event data shown on a page can never run), no
/// plugins, no framing, no form posted elsewhere.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                       connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// The console's routes, to be merged into the daemon's router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| async { Redirect::permanent("/ui/") }))
        .route("/ui/", get(|| async { file("text/html; charset=utf-8", INDEX) }))
        .route("/ui/app.js", get(|| async { file("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/ui/app.css", get(|| async { file("text/css; charset=utf-8", STYLE) }))
}

fn file(content_type: &'static str, body: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    no_store(headers);
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    response
}

/// Marks a response as not to be kept by any cache: the console's pages
/// and the API's answers (which carry event data) alike.
pub fn no_store(headers: &mut axum::http::HeaderMap) {
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
}
