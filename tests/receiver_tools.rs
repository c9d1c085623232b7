//! The receiving side: the README's verification recipes, run against a real
//! delivery; the `verify` command; and the `receive` command as a webhook
//! target of the real daemon.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const W1: &str = "11111111-1111-4111-8111-111111111111";
const SETTLE: Duration = Duration::from_secs(15);

/// The code block that follows `<!-- recipe:NAME -->` in the README.
fn recipe(name: &str) -> String {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find(&format!("<!-- recipe:{name} -->"))
        .expect("recipe marker in README");
    let block = &readme[start..];
    let open = block.find("```").unwrap();
    let body = &block[open..];
    let code_start = body.find('\n').unwrap() + 1;
    let code_end = body[code_start..].find("```").unwrap();
    body[code_start..code_start + code_end].to_owned()
}

/// One real delivery: its headers (as JSON) and raw body, written to files.
fn captured_delivery(dir: &std::path::Path) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nallow_private_targets = true\n\n{}",
        webhook(W1, CLIENT_A, &rx.url("/ok/r"), r#"["*"]"#)
    );
    let d = Daemon::start("", &cfg);
    assert_eq!(
        d.send(
            "meeting.completed",
            CLIENT_A,
            r#"{"note": "naïve \"quoted\"", "n": 1.50}"#
        )
        .0,
        202
    );
    wait_for("a delivery", SETTLE, || rx.hits().len() == 1);
    let hit = rx.hits().remove(0);
    let headers = dir.join("headers.json");
    let body = dir.join("body.bin");
    std::fs::write(&headers, serde_json::to_vec(&hit.headers).unwrap()).unwrap();
    std::fs::write(&body, &hit.body).unwrap();
    (format!("whsec_{W1}"), headers, body)
}

fn runtime_present(cmd: &str) -> bool {
    Command::new(cmd)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `program` on `script`, expecting exit 0 for the real delivery and
/// exit 1 once the body is tampered with.
fn check_recipe(
    program: &str,
    flag: &str,
    script: &str,
    secret: &str,
    headers: &std::path::Path,
    body: &std::path::Path,
) {
    let dir = body.parent().unwrap();
    let run = |body_file: &std::path::Path| {
        Command::new(program)
            .args([flag, script])
            .env("SECRET", secret)
            .env("HEADERS", headers)
            .env("BODY", body_file)
            .status()
            .unwrap()
            .code()
    };
    assert_eq!(
        run(body),
        Some(0),
        "{program} recipe rejects a genuine delivery"
    );
    let mut tampered = std::fs::read(body).unwrap();
    let last = tampered.len() - 2;
    tampered[last] ^= 1;
    let tampered_file = dir.join("tampered.bin");
    std::fs::write(&tampered_file, tampered).unwrap();
    assert_eq!(
        run(&tampered_file),
        Some(1),
        "{program} recipe accepts a tampered body"
    );
}

#[test]
fn readme_recipes_verify_a_real_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let (secret, headers, body) = captured_delivery(dir.path());
    let mut ran = 0;
    if runtime_present("python3") {
        let py = format!(
            "{}\nimport json, os, sys\nh = json.load(open(os.environ['HEADERS']))\nb = open(os.environ['BODY'], 'rb').read()\nsys.exit(0 if verify_nexor(os.environ['SECRET'], h, b) else 1)\n",
            recipe("python")
        );
        check_recipe("python3", "-c", &py, &secret, &headers, &body);
        ran += 1;
    } else {
        eprintln!("skipped: python3 not installed");
    }
    if runtime_present("node") {
        let js = format!(
            "{}\nconst fs = require('fs');\nconst h = JSON.parse(fs.readFileSync(process.env.HEADERS));\nconst b = fs.readFileSync(process.env.BODY);\nprocess.exit(verifyNexor(process.env.SECRET, h, b) ? 0 : 1);\n",
            recipe("node")
        );
        check_recipe("node", "-e", &js, &secret, &headers, &body);
        ran += 1;
    } else {
        eprintln!("skipped: node not installed");
    }
    assert!(
        ran > 0 || std::env::var_os("CI").is_none(),
        "CI must run at least one recipe"
    );
}

#[test]
fn verify_command_accepts_genuine_and_rejects_tampered() {
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body.json");
    std::fs::write(
        &body,
        br#"{"event_type":"meeting.scheduled","event_id":"550e8400-e29b-41d4-a716-446655440000"}"#,
    )
    .unwrap();
    let sig = "v1=084fb1e5efba6beb10cb24341e5ec0cf9944e53a12b00079d40992f378f3e647";
    let verify = |secret: &str, signature: &str, tolerance: &str| {
        let out = Command::new(bin())
            .args([
                "verify",
                "--secret",
                secret,
                "--timestamp",
                "1776443400",
                "--signature",
                signature,
                "--tolerance",
                tolerance,
                "--body",
            ])
            .arg(&body)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        )
    };
    assert_eq!(
        verify("whsec_test", sig, "100000d"),
        (Some(0), "valid".into())
    );
    let rotated = format!("v1={},{sig}", "0".repeat(64));
    assert_eq!(verify("whsec_test", &rotated, "100000d").0, Some(0));
    assert_eq!(
        verify("whsec_other", sig, "100000d"),
        (Some(1), "invalid: no signature matches the secret".into())
    );
    let (code, text) = verify("whsec_test", sig, "5m");
    assert_eq!(code, Some(1));
    assert!(text.contains("more than the tolerance"), "{text}");
}

#[test]
fn receive_command_verifies_deliveries_from_the_daemon() {
    let port = free_port();
    let secret = format!("whsec_{W1}");
    let mut receiver = Command::new(bin())
        .args([
            "receive",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--secret",
            &secret,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(receiver.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("listening on"));
    let cfg = format!(
        "[delivery]\nallow_private_targets = true\n\n{}",
        webhook(
            W1,
            CLIENT_A,
            &format!("http://127.0.0.1:{port}/hook"),
            r#"["*"]"#
        )
    );
    let d = Daemon::start("", &cfg);
    let (_, body) = d.send("meeting.no_show", CLIENT_A, "{}");
    let id = body["event_id"].as_str().unwrap();
    let line = lines.next().unwrap().unwrap();
    d.wait_settled(id, &["succeeded"], SETTLE);
    receiver.kill().unwrap();
    receiver.wait().unwrap();
    assert!(line.contains("meeting.no_show"), "{line}");
    assert!(line.contains(&format!("event_id={id}")), "{line}");
    assert!(line.ends_with("verified, answered 200"), "{line}");
}
