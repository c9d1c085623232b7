//! `nexor-webhookd receive`: a local receiver for people integrating Nexor
//! webhooks. It verifies each delivery's signature and timestamp with
//! [`sign::verify`], prints one line per request, and can answer with
//! failures on purpose so retries can be watched. It shares nothing with the
//! daemon's state; it is a separate process on the other end of the wire.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::Router;

use crate::{clock, sign};

pub struct Options {
    pub listen: SocketAddr,
    pub secret: String,
    pub tolerance: Duration,
    pub verbose: bool,
    /// Answer this status to every verified request (default 200).
    pub status: u16,
    /// Fraction of verified requests answered 503 instead.
    pub fail_rate: f64,
}

struct Receiver {
    opts: Options,
}

pub async fn run(opts: Options) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(opts.listen).await?;
    println!("listening on http://{} — point a webhook's url here", listener.local_addr()?);
    let state = Arc::new(Receiver { opts });
    let app = Router::new().fallback(handle).with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    println!("stopped");
    Ok(())
}

async fn handle(
    State(r): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, &'static str) {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
    let verdict = sign::verify(
        &r.opts.secret,
        header("x-nexor-signature"),
        header("x-nexor-timestamp"),
        &body,
        r.opts.tolerance,
        clock::now_ms() / 1000,
    );
    let envelope: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let field = |k: &str| envelope[k].as_str().unwrap_or("-").to_owned();
    let (status, reply, outcome) = match &verdict {
        Err(e) => (StatusCode::UNAUTHORIZED, "signature rejected\n", format!("REJECTED: {e}")),
        Ok(()) if r.should_fail() => (
            StatusCode::SERVICE_UNAVAILABLE,
            "failing on purpose\n",
            "verified, answered 503 on purpose".into(),
        ),
        Ok(()) => {
            let status = StatusCode::from_u16(r.opts.status).unwrap_or(StatusCode::OK);
            // `--status 503` is a failure on purpose: the body says so too.
            let reply = if status.is_success() { "ok\n" } else { "failing on purpose\n" };
            (status, reply, format!("verified, answered {}", status.as_u16()))
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{} {} event_id={} delivery_id={} webhook_id={}{} {}",
        clock::format_ms(clock::now_ms()),
        header("x-nexor-event"),
        field("event_id"),
        field("delivery_id"),
        field("webhook_id"),
        if envelope["test"] == true { " (test)" } else { "" },
        outcome
    );
    if r.opts.verbose {
        let _ = writeln!(out, "{}", pretty_as_sent(&body));
    }
    let _ = out.flush();
    (status, reply)
}

impl Receiver {
    /// Whether to fail this request on purpose, for `--fail-rate`.
    fn should_fail(&self) -> bool {
        self.opts.fail_rate > 0.0 && fastrand::f64() < self.opts.fail_rate
    }
}

/// The body as pretty JSON with its keys in the order they were sent (a
/// `serde_json::Value` would sort them), streamed from parser to printer;
/// the raw text if it is not JSON.
fn pretty_as_sent(body: &[u8]) -> String {
    let mut out = Vec::new();
    let mut reader = serde_json::Deserializer::from_slice(body);
    let mut writer = serde_json::Serializer::pretty(&mut out);
    match serde_transcode::transcode(&mut reader, &mut writer) {
        Ok(()) => String::from_utf8(out).unwrap_or_default(),
        Err(_) => String::from_utf8_lossy(body).into_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn verbose_output_keeps_the_order_keys_were_sent_in() {
        let body =
            br#"{"event_type":"meeting.scheduled","event_id":"e","data":{"z":1,"a":[2,{"y":3,"b":4}]}}"#;
        let pretty = super::pretty_as_sent(body);
        let order: Vec<usize> = ["event_type", "event_id", "data", "\"z\"", "\"a\"", "\"y\"", "\"b\""]
            .iter()
            .map(|k| pretty.find(k).unwrap())
            .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{pretty}");
        assert!(pretty.contains("\n  \"event_id\": \"e\""), "{pretty}");
        assert_eq!(super::pretty_as_sent(b"not json"), "not json");
    }
}
