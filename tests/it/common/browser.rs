//! A real browser for the console's tests: Debian's chromedriver, driving
//! headless Chromium, over WebDriver on loopback. `.ci/run` installs both
//! (`chromium`, `chromium-driver`); the tests that need them are ignored
//! by a plain `cargo test` and run with `--ignored`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

/// chromedriver and the Chromium profile it starts, cleaned up on drop (a
/// failing test too). chromedriver runs in a process group of its own,
/// which Chromium joins, so that nothing outlives the test.
pub struct Driver {
    child: Child,
    port: u16,
    profile: PathBuf,
}

impl Driver {
    pub fn start() -> Driver {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver on PATH (Debian: chromium-driver)");
        let profile = std::env::temp_dir().join(format!("nexor-console-{}-{port}", std::process::id()));
        let d = Driver { child, port, profile };
        super::wait_for("chromedriver to be ready", Duration::from_secs(20), || {
            d.ask("/status", "\"ready\":true")
        });
        d
    }

    /// A raw GET on chromedriver; whether the answer contains `want`. (It
    /// answers HTTP/1.0 with nothing, and may keep the socket open after
    /// the body: so HTTP/1.1, and no waiting for the end of the stream.)
    fn ask(&self, path: &str, want: &str) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let (mut body, mut buf) = (Vec::new(), [0u8; 1024]);
        while let Ok(n @ 1..) = s.read(&mut buf) {
            body.extend_from_slice(&buf[..n]);
            if String::from_utf8_lossy(&body).contains(want) {
                return true;
            }
        }
        false
    }

    /// A new browser session, its page area 1280×800.
    pub async fn session(&self) -> Client {
        let caps = json!({
            "browserName": "chrome",
            // An alert stays open, for the test to see.
            "unhandledPromptBehavior": "ignore",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                // As root in a sandbox, on a machine with no way out.
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,800",
                    format!("--user-data-dir={}", self.profile.display())],
            }
        });
        let serde_json::Value::Object(caps) = caps else { unreachable!("an object") };
        let c = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://127.0.0.1:{}", self.port))
            .await
            .expect("a browser session");
        // The window size is the outer one: grow it by the browser's frame.
        let frame =
            c.execute("return [outerWidth - innerWidth, outerHeight - innerHeight]", vec![]).await.unwrap();
        let (dx, dy) = (frame[0].as_u64().unwrap() as u32, frame[1].as_u64().unwrap() as u32);
        c.set_window_size(1280 + dx, 800 + dy).await.unwrap();
        c
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // chromedriver's own shutdown closes its sessions and removes their
        // temp dirs, which a signal would leave; then the group must be gone.
        self.ask("/shutdown", "\r\n\r\n");
        let group = format!("-{}", self.child.id());
        let kill = |sig: &str| {
            Command::new("kill")
                .args([sig, "--", &group])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.child.try_wait().is_ok_and(|s| s.is_none()) || kill("-0") {
            if Instant::now() > deadline {
                kill("-KILL");
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The element `css`, once it is on the page.
pub async fn find(c: &Client, css: &str) -> Element {
    c.wait()
        .at_most(Duration::from_secs(15))
        .for_element(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
}

/// Waits until the text of `css` satisfies `ok`; returns it.
pub async fn text_until(c: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = match c.find(Locator::Css(css)).await {
            Ok(e) => e.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if ok(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{css}: still {text:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The text of an open JavaScript dialog, if one is open.
pub async fn open_dialog(c: &Client) -> Option<String> {
    match c.get_alert_text().await {
        Ok(text) => Some(text),
        Err(e) if e.is_no_such_alert() => None,
        Err(e) => panic!("asking for a dialog: {e}"),
    }
}

/// Saves what the page shows as `name`.png under `target/console`, and
/// also under `$NEXOR_WEBHOOKD_SCREENSHOTS` when that is set (the README's
/// pictures: see its Console section).
pub async fn screenshot(c: &Client, name: &str) {
    let png = c.screenshot().await.unwrap();
    let mut dirs = vec![PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console")];
    dirs.extend(std::env::var_os("NEXOR_WEBHOOKD_SCREENSHOTS").map(PathBuf::from));
    for dir in dirs {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), &png).unwrap();
    }
}
