//! The command-line client: `send`, `status`, `redeliver`, `cancel` and
//! `backup` talk to the running daemon over its HTTP API, at the address
//! and with the token of its config file. Blocking (ureq); no state of its own.

use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::config::Config;

/// `POST /v1/events` with `data` as given.
#[derive(serde::Serialize)]
struct Ingest<'a> {
    event_type: &'a str,
    client_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
    data: &'a RawValue,
}

pub struct Client {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(config: &Config) -> Client {
        let mut addr = config.server.listen;
        // A daemon listening on every address is reachable on loopback.
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() {
                [127, 0, 0, 1].into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .proxy(None)
            .build()
            .new_agent();
        Client {
            base: format!("http://{addr}"),
            token: config.server.api_token.as_ref().map(|t| t.expose().clone()),
            agent,
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<String>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base);
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let result = match (method, body) {
            ("GET", _) => {
                let mut r = self.agent.get(&url);
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.call()
            }
            (_, body) => {
                let mut r = self.agent.post(&url).header("Content-Type", "application/json");
                if let Some(a) = &auth {
                    r = r.header("Authorization", a);
                }
                r.send(body.unwrap_or_default().as_bytes())
            }
        };
        let mut resp = result.with_context(|| format!("cannot reach the daemon at {}", self.base))?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status >= 400 {
            let message =
                value["error"]["message"].as_str().map(str::to_owned).unwrap_or_else(|| value.to_string());
            bail!("HTTP {status}: {message}");
        }
        Ok(value)
    }

    /// `send`: posts one event; `data` is JSON text, or `@FILE`.
    pub fn send(
        &self,
        event_type: &str,
        client_id: &str,
        data: &str,
        event_id: Option<&str>,
    ) -> anyhow::Result<()> {
        let data_text = match data.strip_prefix('@') {
            Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read {path}"))?,
            None => data.to_owned(),
        };
        // The data goes out byte for byte as given (key order, escapes,
        // number forms), as the application's own request would carry it.
        let data = RawValue::from_string(data_text.trim().to_owned()).context("--data is not JSON")?;
        let body = Ingest { event_type, client_id, event_id, data: &data };
        let answer = self.call("POST", "/v1/events", Some(serde_json::to_string(&body)?))?;
        println!("{answer}");
        Ok(())
    }

    /// `status`: one line per webhook with its health.
    pub fn status(&self) -> anyhow::Result<()> {
        let answer = self.call("GET", "/v1/webhooks", None)?;
        println!(
            "{:<36}  {:<13}  {:>7} {:>8} {:>9} {:>6} {:>9} {:>6}  {:<24}  last failure",
            "webhook",
            "state",
            "pending",
            "retrying",
            "succeeded",
            "failed",
            "cancelled",
            "held",
            "last success"
        );
        for w in answer["webhooks"].as_array().into_iter().flatten() {
            let h = &w["health"];
            let n = |s: &str| h["deliveries"][s].as_u64().unwrap_or(0);
            let failures = h["consecutive_failures"].as_u64().unwrap_or(0);
            let state = match (w["enabled"].as_bool(), w["paused_reason"].as_str(), failures) {
                (Some(false), _, _) => "disabled".to_owned(),
                (_, Some(reason), _) => format!("paused ({reason})"),
                (_, None, 0) => "ok".to_owned(),
                (_, None, f) => format!("failing ({f})"),
            };
            let last_failure = match (h["last_failure_at"].as_str(), h["last_failure"].as_str()) {
                (Some(at), reason) => format!("{at} {}", reason.unwrap_or("")),
                _ => "-".to_owned(),
            };
            println!(
                "{:<36}  {:<13}  {:>7} {:>8} {:>9} {:>6} {:>9} {:>6}  {:<24}  {}",
                w["id"].as_str().unwrap_or("?"),
                state,
                n("pending"),
                n("retrying"),
                n("succeeded"),
                n("failed"),
                n("cancelled"),
                n("held"),
                h["last_success_at"].as_str().unwrap_or("-"),
                last_failure
            );
        }
        Ok(())
    }

    /// `pause` and `resume`: a webhook's deliveries held, or due again.
    pub fn set_paused(&self, webhook_id: &str, paused: bool) -> anyhow::Result<()> {
        let verb = if paused { "pause" } else { "resume" };
        let answer = self.call("POST", &format!("/v1/webhooks/{webhook_id}/{verb}"), None)?;
        println!("{answer}");
        Ok(())
    }

    /// `cancel`: cancels every delivery to a webhook that waits or is held.
    pub fn cancel(&self, webhook_id: &str) -> anyhow::Result<()> {
        let answer = self.call("POST", &format!("/v1/webhooks/{webhook_id}/cancel"), None)?;
        println!("{answer}");
        Ok(())
    }

    /// `backup`: has the daemon copy its store to `to` (made absolute here:
    /// the daemon's working directory is not the caller's).
    pub fn backup(&self, to: &std::path::Path) -> anyhow::Result<()> {
        let to = std::path::absolute(to).with_context(|| format!("cannot resolve {}", to.display()))?;
        let encoded: String =
            url::form_urlencoded::byte_serialize(to.as_os_str().as_encoded_bytes()).collect();
        let answer = self.call("POST", &format!("/v1/storage/backup?to={encoded}"), None)?;
        println!("{answer}");
        Ok(())
    }

    /// `redeliver`: attempts an event's failed or cancelled deliveries again.
    pub fn redeliver(&self, event_id: &str, webhook_id: Option<&str>) -> anyhow::Result<()> {
        let query = webhook_id.map(|w| format!("?webhook_id={w}")).unwrap_or_default();
        let answer = self.call("POST", &format!("/v1/events/{event_id}/redeliver{query}"), None)?;
        println!("{answer}");
        Ok(())
    }
}
