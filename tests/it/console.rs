//! The operator console at `/ui/`, in a real browser (headless Chromium
//! through chromedriver) against the real daemon and real receivers: sign
//! in, Test, the Events list and an event's page, Redeliver, Pause and
//! Resume, hostile event data, and nothing without the token.

use std::time::Duration;

use fantoccini::{Client, Locator};
use serde_json::Value;

use crate::common::browser::{find, open_dialog, screenshot, text_until, Driver};
use crate::common::*;

const W1: &str = "11111111-1111-4111-8111-111111111111";
const W2: &str = "22222222-2222-4222-8222-222222222222";
const TOKEN: &str = "console-token-5b1e";
const SETTLE: Duration = Duration::from_secs(15);

/// Runs `test` in a browser session of its own, on a runtime of its own.
fn in_browser(test: impl AsyncFnOnce(&Client)) {
    let driver = Driver::start();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let c = driver.session().await;
        test(&c).await;
        c.close().await.unwrap();
    });
}

fn webhook_state(d: &Daemon, id: &str) -> String {
    let (status, w) = d.request("GET", &format!("/v1/webhooks/{id}"), Some(TOKEN), None);
    assert_eq!(status, 200, "{w}");
    w["state"].as_str().unwrap().to_owned()
}

/// Waits until every delivery of the event is in `status` (asked with the token).
fn wait_status(d: &Daemon, event_id: &str, status: &str) {
    wait_for(&format!("{event_id} {status}"), SETTLE, || {
        let (code, e) = d.request("GET", &format!("/v1/events/{event_id}"), Some(TOKEN), None);
        code == 200 && e["deliveries"].as_array().unwrap().iter().all(|x| x["status"] == status)
    });
}

/// Sends a `meeting.scheduled` event for `client` with the token; its id.
fn send_with_token(d: &Daemon, client: &str) -> String {
    let body = format!(r#"{{"event_type":"meeting.scheduled","client_id":"{client}","data":{{}}}}"#);
    let (status, sent) = d.request("POST", "/v1/events", Some(TOKEN), Some(body.as_bytes()));
    assert_eq!(status, 202, "{sent}");
    sent["event_id"].as_str().unwrap().to_owned()
}

async fn click(c: &Client, css: &str) {
    find(c, css).await.click().await.unwrap_or_else(|e| panic!("clicking {css}: {e}"));
}

#[test]
#[ignore = "needs chromium and chromium-driver; .ci/run installs them and runs ignored tests"]
fn an_operator_signs_in_tests_redelivers_pauses_and_resumes_from_the_browser() {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nretry_schedule = []\nallow_private_targets = true\n\n{}{}",
        webhook(W1, CLIENT_A, &rx.url("/ok/w1"), r#"["*"]"#),
        webhook(W2, CLIENT_B, &rx.url("/flaky/1/w2"), r#"["*"]"#),
    );
    let d = Daemon::start(&format!("api_token = \"{TOKEN}\""), &cfg);
    let ui = format!("{}/ui/", d.base);
    in_browser(async |c| {
        // Without the token: a sign-in form and nothing else.
        c.goto(&ui).await.unwrap();
        assert!(find(c, "#login:not([hidden])").await.is_displayed().await.unwrap());
        assert!(!find(c, "#nav").await.is_displayed().await.unwrap(), "navigation hidden");
        assert_eq!(find(c, "#page").await.text().await.unwrap(), "");
        screenshot(c, "sign-in").await;
        find(c, "#token").await.send_keys("wrong").await.unwrap();
        click(c, "#login button[type=submit]").await;
        text_until(c, "#login-error", |t| t == "That token was refused.").await;
        find(c, "#token").await.send_keys(TOKEN).await.unwrap();
        click(c, "#login button[type=submit]").await;
        find(c, "#accepted").await;
        assert!(!find(c, "#login").await.is_displayed().await.unwrap(), "the sign-in form is gone");
        assert!(find(c, "#nav").await.is_displayed().await.unwrap());

        // Webhooks: Test sends a test event to that webhook only.
        c.goto(&format!("{ui}#/webhooks")).await.unwrap();
        click(c, &format!("tr[data-webhook='{W1}'] button[data-action=test]")).await;
        let note = text_until(c, "#notice", |t| t.starts_with("Test event ")).await;
        let event_id = note.trim_start_matches("Test event ").trim_end_matches(" sent.").to_owned();
        wait_for("the test delivery", SETTLE, || rx.hits_on("/ok/w1").len() == 1);
        assert_eq!(rx.hits_on("/ok/w1")[0].json()["event_id"], event_id.as_str());
        assert_eq!(rx.hits_on("/ok/w1")[0].json()["test"], true);
        screenshot(c, "webhooks").await;

        // …and it shows in the Events list, which links to its page.
        wait_status(&d, &event_id, "succeeded");
        c.goto(&format!("{ui}#/events")).await.unwrap();
        click(c, &format!("tr[data-event='{event_id}'] a")).await;
        text_until(c, "#envelope", |t| t.contains(&event_id)).await;

        // Redeliver sends a failed delivery again, with a new delivery id.
        let failed = send_with_token(&d, CLIENT_B);
        wait_status(&d, &failed, "failed");
        c.goto(&format!("{ui}#/events?status=failed")).await.unwrap();
        click(c, &format!("tr[data-event='{failed}'] a")).await;
        click(c, "#redeliver").await;
        text_until(c, "#notice", |t| t.starts_with("1 failed or cancelled deliveries queued again")).await;
        wait_status(&d, &failed, "succeeded");
        let ids: Vec<String> =
            rx.hits_on("/flaky/1/w2").iter().map(|h| h.header("x-nexor-delivery-id").to_owned()).collect();
        assert_eq!(ids.len(), 2);
        assert_ne!(ids[0], ids[1], "a new delivery id");
        c.refresh().await.unwrap();
        text_until(c, ".delivery .badge", |t| t == "succeeded").await;
        screenshot(c, "event").await;

        // Pause holds deliveries; Resume releases them.
        c.goto(&format!("{ui}#/webhooks")).await.unwrap();
        click(c, &format!("tr[data-webhook='{W1}'] button[data-action=pause]")).await;
        text_until(c, &format!("tr[data-webhook='{W1}'] .badge"), |t| t == "paused").await;
        assert_eq!(webhook_state(&d, W1), "paused");
        let held = send_with_token(&d, CLIENT_A);
        wait_status(&d, &held, "held");
        assert_eq!(rx.hits_on("/ok/w1").len(), 1, "nothing sent while paused");
        click(c, &format!("tr[data-webhook='{W1}'] button[data-action=resume]")).await;
        text_until(c, "#notice", |t| t.ends_with("1 held deliveries released.")).await;
        wait_status(&d, &held, "succeeded");
        assert_eq!(webhook_state(&d, W1), "active");

        // The overview counts what happened.
        c.goto(&ui).await.unwrap();
        text_until(c, "#accepted strong", |t| t == "3").await;
        screenshot(c, "overview").await;
        c.goto(&format!("{ui}#/events")).await.unwrap();
        find(c, "#events").await;
        screenshot(c, "events").await;

        // Recover asks for a webhook's failed deliveries since a time (W2's
        // one failure was redelivered and succeeded: none is left).
        c.goto(&format!("{ui}#/recover")).await.unwrap();
        find(c, &format!("#recover option[value='{W2}']")).await.click().await.unwrap();
        click(c, "#recover button[type=submit]").await;
        text_until(c, "#notice", |t| t.starts_with("0 failed deliveries since ")).await;

        // Signing out forgets the token: nothing shown, nothing changed.
        click(c, "#signout").await;
        find(c, "#login:not([hidden])").await;
        c.goto(&format!("{ui}#/webhooks")).await.unwrap();
        c.refresh().await.unwrap();
        assert!(find(c, "#login:not([hidden])").await.is_displayed().await.unwrap());
        assert!(c.find(Locator::Css("#webhooks")).await.is_err(), "no webhooks shown without the token");
        let answer = c
            .execute_async(
                &format!(
                    "const done = arguments[0]; fetch('/v1/webhooks/{W1}/pause', {{method: 'POST'}}).then(r => done(r.status))"
                ),
                vec![],
            )
            .await
            .unwrap();
        assert_eq!(answer, Value::from(401));
        assert_eq!(webhook_state(&d, W1), "active", "a request without the token changed nothing");
    });
}

#[test]
#[ignore = "needs chromium and chromium-driver; .ci/run installs them and runs ignored tests"]
fn hostile_event_data_is_shown_as_text_and_runs_nothing() {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nallow_private_targets = true\n\n{}",
        webhook(W1, CLIENT_A, &rx.url("/ok/w1"), r#"["*"]"#)
    );
    // No token on loopback: the console opens directly.
    let d = Daemon::start("", &cfg);
    let hostile = r#"{"img":"<img src=x onerror=alert(1)>","script":"</script><script>alert(2)</script>","href":"javascript:alert(3)","bidi":"click\u202egnp.exe"}"#;
    let (status, sent) = d.send("meeting.scheduled", CLIENT_A, hostile);
    assert_eq!(status, 202, "{sent}");
    let id = sent["event_id"].as_str().unwrap().to_owned();
    d.wait_settled(&id, &["succeeded"], SETTLE);
    let ui = format!("{}/ui/", d.base);
    in_browser(async |c| {
        c.goto(&ui).await.unwrap();
        find(c, "#accepted").await;
        c.goto(&format!("{ui}#/events")).await.unwrap();
        find(c, &format!("tr[data-event='{id}']")).await;
        c.goto(&format!("{ui}#/event/{id}")).await.unwrap();
        let shown = text_until(c, "#envelope", |t| t.contains("onerror")).await;
        for text in
            ["<img src=x onerror=alert(1)>", "</script><script>alert(2)</script>", "javascript:alert(3)"]
        {
            assert!(shown.contains(text), "{text} shown as text in {shown}");
        }
        assert!(
            c.find(Locator::Css("#envelope img, #page script")).await.is_err(),
            "no element made of the data"
        );
        assert!(shown.contains(r"click\u202egnp.exe"), "a bidi control is written out: {shown}");
        assert_eq!(open_dialog(c).await, None, "no dialog opened");
        // A big event's page shows its start, and says so.
        let big = format!(r#"{{"a":[{}0]}}"#, "0,".repeat(200_000));
        let (status, sent) = d.send("meeting.scheduled", CLIENT_A, &big);
        assert_eq!(status, 202, "{sent}");
        c.goto(&format!("{ui}#/event/{}", sent["event_id"].as_str().unwrap())).await.unwrap();
        text_until(c, "#envelope", |t| t.contains("the first 65536 of")).await;
    });
}

#[test]
fn the_console_is_served_with_a_strict_policy_and_nothing_is_cached() {
    let d = Daemon::start(&format!("api_token = \"{TOKEN}\""), "");
    let agent =
        ureq::Agent::config_builder().http_status_as_error(false).max_redirects(0).build().new_agent();
    let get = |path: &str| agent.get(format!("{}{path}", d.base)).call().unwrap();
    let moved = get("/ui");
    assert_eq!((moved.status().as_u16(), moved.headers()["location"].to_str().unwrap()), (308, "/ui/"));
    for (path, kind) in
        [("/ui/", "text/html"), ("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")]
    {
        let mut r = get(path);
        let header =
            |name: &str| r.headers().get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        assert_eq!(r.status(), 200, "{path}");
        assert!(header("content-type").starts_with(kind), "{path}");
        let csp = header("content-security-policy");
        for rule in ["default-src 'none'", "script-src 'self'", "style-src 'self'", "frame-ancestors 'none'"]
        {
            assert!(csp.split("; ").any(|r| r == rule), "{path}: {rule} not in {csp}");
        }
        assert!(!csp.contains("unsafe"), "{csp}");
        assert_eq!(
            (header("cache-control"), header("x-content-type-options")),
            ("no-store".into(), "nosniff".into())
        );
        let body = r.body_mut().read_to_string().unwrap();
        // Nothing inline for the policy to allow, nothing from elsewhere
        // (SVG's namespace is a name, not a place).
        let elsewhere = body.replace("http://www.w3.org/2000/svg", "").contains("://");
        assert!(!body.contains("<script>") && !body.contains("style=") && !elsewhere, "{path}");
    }
    // Nor the daemon's other answers.
    for path in ["/healthz", "/metrics", "/no-such-thing"] {
        assert_eq!(get(path).headers()["cache-control"], "no-store", "{path}");
    }
    // The API's answers, a refusal too, are not to be cached either.
    for token in [None, Some(TOKEN)] {
        let mut req = agent.get(format!("{}/v1/overview", d.base));
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let r = req.call().unwrap();
        assert_eq!(r.status(), if token.is_some() { 200 } else { 401 });
        assert_eq!(r.headers()["cache-control"], "no-store");
    }
}
