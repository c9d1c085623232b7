//! The configuration as the daemon reads it: the file, and whatever its
//! validation needs from this machine (secret files, the environment, the
//! logger's filter syntax), plus [`Shared`], the handle on the config in
//! force that a reload swaps.
//!
//! Parsing and validation themselves are the core's
//! (`nexor_webhookd_core::config`, re-exported here), which does no I/O:
//! everything it needs from outside the text it asks of [`System`].

use std::path::Path;
use std::sync::Arc;

pub use nexor_webhookd_core::config::*;

/// The real outside: files, the process's environment, tracing's filters.
struct System;

impl Outside for System {
    fn read_file(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn log_filter_error(&self, filter: &str) -> Option<String> {
        tracing_subscriber::EnvFilter::try_new(filter).err().map(|e| e.to_string())
    }
}

/// Reads and validates the file at `path`. A relative `[storage] path` is
/// taken relative to the directory holding the file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_owned(),
        problems: vec![Problem { line: None, message: format!("cannot read: {e}") }],
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    let mut config =
        parse(&text, base, &System).map_err(|problems| ConfigError { file: path.to_owned(), problems })?;
    if config.has_inline_secrets() && mode_grants(path, 0o004) {
        config.warnings.push(format!(
            "{} holds secrets and is readable by other users; chmod 600 it, or use secret_file / api_token_file",
            path.display()
        ));
    }
    // Its group or other users, any access.
    if mode_grants(&config.storage.path, 0o077) {
        config.warnings.push(format!(
            "the storage directory {} is open to its group or other users, and events carry personal \
             data; chmod 700 it (the daemon makes everything in it private to its own user)",
            config.storage.path.display()
        ));
    }
    Ok(config)
}

/// Whether `path` exists and its mode grants any of the permission `bits`.
fn mode_grants(path: &Path, bits: u32) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & bits != 0)
}

/// The configuration in force: a cheap-to-clone handle whose contents are
/// swapped whole on reload, so every reader sees one consistent version;
/// background tasks can wait for the next swap.
#[derive(Clone)]
pub struct Shared(Arc<tokio::sync::watch::Sender<Arc<Config>>>);

impl Shared {
    pub fn new(config: Config) -> Shared {
        Shared(Arc::new(tokio::sync::watch::Sender::new(Arc::new(config))))
    }

    pub fn get(&self) -> Arc<Config> {
        self.0.borrow().clone()
    }

    pub fn set(&self, config: Config) {
        self.0.send_replace(Arc::new(config));
    }

    /// A receiver whose `changed()` completes at the next reload.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<Config>> {
        self.0.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[storage]
path = "data"

[delivery]
allow_private_targets = true

[[webhooks]]
id = "0b7d9c3a-4a57-4d2e-9a51-5f0b6f2a8c01"
client_id = "6f1c1a3e-2b6e-4c1e-9d55-0c8a3f7e9b10"
url = "http://127.0.0.1:9000/hook"
secret = "whsec_x"
events = ["meeting.scheduled"]
"#;

    #[test]
    fn world_readable_file_with_inline_secrets_warns() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, GOOD).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(load(&path).unwrap().warnings[0].contains("readable by other users"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(load(&path).unwrap().warnings.is_empty());
    }

    #[test]
    fn the_example_config_starts_without_a_warning_but_not_off_loopback() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        let example = include_str!("../config.example.toml");
        std::fs::write(&path, example).unwrap();
        // As a checkout leaves it.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(load(&path).unwrap().warnings, Vec::<String>::new());
        let open =
            example.replace("listen = \"127.0.0.1:8088\"", "listen = \"0.0.0.0:8088\"\napi_token = \"t\"");
        std::fs::write(&path, open).unwrap();
        let warnings = load(&path).unwrap().warnings;
        assert!(warnings.iter().any(|w| w.contains("example's secret")), "{warnings:?}");
    }

    #[test]
    fn secrets_and_the_token_come_from_files_beside_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.toml");
        std::fs::write(dir.path().join("hook.secret"), "from-file\n").unwrap();
        std::fs::write(dir.path().join("token"), "t0ken\n").unwrap();
        let text = GOOD
            .replace("secret = \"whsec_x\"", "secret_file = \"hook.secret\"")
            .replace("[storage]", "[server]\napi_token_file = \"token\"\n\n[storage]");
        std::fs::write(&path, text).unwrap();
        let c = load(&path).unwrap();
        assert_eq!(c.webhooks()[0].secret.expose(), "from-file");
        assert_eq!(c.server.api_token.as_ref().unwrap().expose(), "t0ken");
        std::fs::remove_file(dir.path().join("token")).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("config.toml:3: api_token_file: cannot read"), "{e}");
    }

    #[test]
    fn log_filters_are_tracings() {
        assert_eq!(System.log_filter_error("info,nexor_webhookd=debug"), None);
        assert!(System.log_filter_error("info,[").is_some());
    }
}
