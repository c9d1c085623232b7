//! The receiving side: the README's verification recipes, run against a real
//! delivery; the `verify` command; and the `receive` command as a webhook
//! target of the real daemon.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;

const W1: &str = "11111111-1111-4111-8111-111111111111";
const SETTLE: Duration = Duration::from_secs(15);

/// The code block that follows `<!-- recipe:NAME -->` in the README.
fn recipe(name: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme.find(&format!("<!-- recipe:{name} -->")).expect("recipe marker in README");
    let block = &readme[start..];
    let open = block.find("```").unwrap();
    let body = &block[open..];
    let code_start = body.find('\n').unwrap() + 1;
    let code_end = body[code_start..].find("```").unwrap();
    body[code_start..code_start + code_end].to_owned()
}

/// One real delivery: its headers (as JSON) and raw body, written to files.
fn captured_delivery(dir: &Path) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let rx = Receiver::start();
    let cfg = format!(
        "[delivery]\nallow_private_targets = true\n\n{}",
        webhook(W1, CLIENT_A, &rx.url("/ok/r"), r#"["*"]"#)
    );
    let d = Daemon::start("", &cfg);
    assert_eq!(d.send("meeting.completed", CLIENT_A, r#"{"note": "naïve \"quoted\"", "n": 1.50}"#).0, 202);
    wait_for("a delivery", SETTLE, || rx.hits().len() == 1);
    let hit = rx.hits().remove(0);
    let headers = dir.join("headers.json");
    let body = dir.join("body.bin");
    std::fs::write(&headers, serde_json::to_vec(&hit.headers).unwrap()).unwrap();
    std::fs::write(&body, &hit.body).unwrap();
    (format!("whsec_{W1}"), headers, body)
}

fn runtime_present(cmd: &str) -> bool {
    let flag = if cmd == "go" { "version" } else { "--version" };
    Command::new(cmd).arg(flag).output().is_ok_and(|o| o.status.success())
}

/// Runs a recipe's driver (`cmd` plus the body file's path in `BODY`),
/// expecting exit 0 for the real delivery and exit 1 once the body is
/// tampered with.
fn check_recipe(name: &str, cmd: impl Fn() -> Command, secret: &str, headers: &Path, body: &Path) {
    let run = |body_file: &Path| {
        cmd().env("SECRET", secret).env("HEADERS", headers).env("BODY", body_file).status().unwrap().code()
    };
    assert_eq!(run(body), Some(0), "{name} recipe rejects a genuine delivery");
    let mut tampered = std::fs::read(body).unwrap();
    let last = tampered.len() - 2;
    tampered[last] ^= 1;
    let tampered_file = body.with_file_name("tampered.bin");
    std::fs::write(&tampered_file, tampered).unwrap();
    assert_eq!(run(&tampered_file), Some(1), "{name} recipe accepts a tampered body");
}

fn inline(program: &'static str, flag: &'static str, script: String) -> impl Fn() -> Command {
    move || {
        let mut c = Command::new(program);
        c.args([flag, &script]);
        c
    }
}

/// Checks one README recipe against a real delivery; its runtime must be
/// installed (the tests of runtimes a fresh machine may lack are ignored
/// by `cargo test`, and `.ci/run` installs them and runs them).
fn recipe_verifies_a_real_delivery(
    runtime: &str,
    name: &'static str,
    cmd: impl Fn(&Path) -> Box<dyn Fn() -> Command>,
) {
    assert!(runtime_present(runtime), "the {name} recipe needs {runtime}, which is not installed");
    let dir = tempfile::tempdir().unwrap();
    let (secret, headers, body) = captured_delivery(dir.path());
    check_recipe(name, cmd(dir.path()), &secret, &headers, &body);
}

#[test]
fn readme_python_recipe_verifies_a_real_delivery() {
    recipe_verifies_a_real_delivery("python3", "python", |_| {
        let driver = "import json, os, sys\nh = json.load(open(os.environ['HEADERS']))\nb = open(os.environ['BODY'], 'rb').read()\nsys.exit(0 if verify_nexor(os.environ['SECRET'], h, b) else 1)\n";
        Box::new(inline("python3", "-c", format!("{}\n{driver}", recipe("python"))))
    });
}

#[test]
#[ignore = "needs node; .ci/run installs it and runs ignored tests"]
fn readme_node_recipe_verifies_a_real_delivery() {
    recipe_verifies_a_real_delivery("node", "node", |_| {
        let driver = "const fs = require('fs');\nconst h = JSON.parse(fs.readFileSync(process.env.HEADERS));\nconst b = fs.readFileSync(process.env.BODY);\nprocess.exit(verifyNexor(process.env.SECRET, h, b) ? 0 : 1);\n";
        Box::new(inline("node", "-e", format!("{}\n{driver}", recipe("node"))))
    });
}

#[test]
#[ignore = "needs ruby; .ci/run installs it and runs ignored tests"]
fn readme_ruby_recipe_verifies_a_real_delivery() {
    recipe_verifies_a_real_delivery("ruby", "ruby", |_| {
        let driver = "require 'json'\nh = JSON.parse(File.read(ENV['HEADERS']))\nb = File.binread(ENV['BODY'])\nexit(verify_nexor(ENV['SECRET'], h, b) ? 0 : 1)\n";
        Box::new(inline("ruby", "-e", format!("{}\n{driver}", recipe("ruby"))))
    });
}

#[test]
#[ignore = "needs go; .ci/run installs it and runs ignored tests"]
fn readme_go_recipe_verifies_a_real_delivery() {
    recipe_verifies_a_real_delivery("go", "go", |dir| {
        let src = dir.join("gorecipe");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("recipe.go"), recipe("go").replace("package nexor", "package main")).unwrap();
        std::fs::write(src.join("main.go"), GO_DRIVER).unwrap();
        let exe = src.join("verify");
        let built = Command::new("go")
            .args(["build", "-o"])
            .arg(&exe)
            .arg("recipe.go")
            .arg("main.go")
            .current_dir(&src)
            .env("GOFLAGS", "-mod=mod")
            .env("GO111MODULE", "off")
            .env("GOCACHE", dir.join("gocache"))
            .status()
            .unwrap();
        assert!(built.success(), "the Go recipe does not compile");
        Box::new(move || Command::new(&exe))
    });
}

const GO_DRIVER: &str = r#"package main

import (
	"encoding/json"
	"net/http"
	"os"
	"time"
)

func main() {
	var h map[string]string
	raw, _ := os.ReadFile(os.Getenv("HEADERS"))
	if json.Unmarshal(raw, &h) != nil {
		os.Exit(2)
	}
	header := http.Header{}
	for k, v := range h {
		header.Set(k, v)
	}
	body, _ := os.ReadFile(os.Getenv("BODY"))
	if VerifyNexor(os.Getenv("SECRET"), header, body, 5*time.Minute) {
		os.Exit(0)
	}
	os.Exit(1)
}
"#;

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
        verify_cli(secret, "1776443400", signature, &body, tolerance)
    };
    assert_eq!(verify("whsec_test", sig, "100000d"), (Some(0), "valid".into()));
    let rotated = format!("v1={},{sig}", "0".repeat(64));
    assert_eq!(verify("whsec_test", &rotated, "100000d").0, Some(0));
    assert_eq!(
        verify("whsec_other", sig, "100000d"),
        (Some(1), "invalid: no signature matches the secret".into())
    );
    let (code, text) = verify("whsec_test", sig, "5m");
    assert_eq!(code, Some(1));
    assert!(text.contains("more than the tolerance"), "{text}");

    // The secret kept out of `ps`: from a file, or from the environment.
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "whsec_test\n").unwrap();
    let hidden = |how: &dyn Fn(&mut Command) -> &mut Command| {
        let mut cmd = Command::new(bin());
        cmd.args([
            "verify",
            "--timestamp",
            "1776443400",
            "--signature",
            sig,
            "--tolerance",
            "100000d",
            "--body",
        ])
        .arg(&body);
        let out = how(&mut cmd).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).trim().to_owned())
    };
    assert_eq!(hidden(&|c| c.arg("--secret-file").arg(&secret_file)), (Some(0), "valid".into()));
    assert_eq!(hidden(&|c| c.env("NEXOR_WEBHOOKD_SECRET", "whsec_test")), (Some(0), "valid".into()));
    assert_eq!(hidden(&|c| c.env("NEXOR_WEBHOOKD_SECRET", "whsec_other")).0, Some(1));
    let (code, _) = hidden(&|c| c.env_remove("NEXOR_WEBHOOKD_SECRET"));
    assert_eq!(code, Some(2), "no secret at all must be refused");
}

#[test]
fn receive_command_verifies_deliveries_from_the_daemon() {
    let port = free_port();
    let secret = format!("whsec_{W1}");
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, &secret).unwrap();
    let mut receiver = Command::new(bin())
        .args(["receive", "--listen", &format!("127.0.0.1:{port}"), "--secret-file"])
        .arg(&secret_file)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", receiver.id())).unwrap();
    assert!(!String::from_utf8_lossy(&cmdline).contains(&secret), "the secret is in ps");
    let mut lines = BufReader::new(receiver.stdout.take().unwrap()).lines();
    assert!(lines.next().unwrap().unwrap().starts_with("listening on"));
    let cfg = format!(
        "[delivery]\nallow_private_targets = true\n\n{}",
        webhook(W1, CLIENT_A, &format!("http://127.0.0.1:{port}/hook"), r#"["*"]"#)
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

/// `receive --status 503` and `--fail-rate 1` fail verified deliveries on
/// purpose, and say so in the body the daemon records with the attempt.
#[test]
fn receive_fails_on_purpose_and_says_so() {
    for flags in [["--status", "503"], ["--fail-rate", "1"]] {
        let port = free_port();
        let mut receiver = Command::new(bin())
            .args(["receive", "--listen", &format!("127.0.0.1:{port}"), "--secret", &format!("whsec_{W1}")])
            .args(flags)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(receiver.stdout.take().unwrap()).lines();
        assert!(lines.next().unwrap().unwrap().starts_with("listening on"));
        let cfg = format!(
            "[delivery]\nretry_schedule = []\nallow_private_targets = true\n\n{}",
            webhook(W1, CLIENT_A, &format!("http://127.0.0.1:{port}/hook"), r#"["*"]"#)
        );
        let d = Daemon::start("", &cfg);
        let (_, body) = d.send("meeting.no_show", CLIENT_A, "{}");
        let id = body["event_id"].as_str().unwrap();
        let line = lines.next().unwrap().unwrap();
        let event = d.wait_settled(id, &["failed"], SETTLE);
        receiver.kill().unwrap();
        receiver.wait().unwrap();
        assert!(line.contains("verified, answered 503"), "{flags:?}: {line}");
        let attempt = &event["deliveries"][0]["attempts"][0];
        assert_eq!(attempt["status_code"], 503, "{flags:?}: {event}");
        assert_eq!(attempt["response_body"], "failing on purpose\n", "{flags:?}: {event}");
    }
}
