//! Where the engine is and how keel introduces itself to it.

use std::time::Duration;

use keel_core::{Error, Result};

/// The namespace an engine bootstraps on first start, and the default one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The pool (runner name) keel joins unless told otherwise.
pub const DEFAULT_POOL: &str = "default";

/// How long [`crate::connect`] waits for the engine's first `Init` before giving up. The
/// client retries a refused connection with backoff meanwhile (a pool without a runner
/// config is refused until one is upserted).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Settings for one envoy connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineConfig {
    /// The engine's guard address, `http://host:port` (`ws://` is derived from it).
    pub endpoint: String,
    /// The engine namespace the actors live in.
    pub namespace: String,
    /// The pool (runner name) this envoy serves; it must have a runner config.
    pub pool: String,
    /// The engine's admin token, if the engine has `auth` configured.
    pub token: Option<String>,
}

impl EngineConfig {
    /// A config for `endpoint` with the default namespace and pool and no token.
    pub fn new(endpoint: impl Into<String>) -> EngineConfig {
        EngineConfig {
            endpoint: endpoint.into(),
            namespace: DEFAULT_NAMESPACE.to_string(),
            pool: DEFAULT_POOL.to_string(),
            token: None,
        }
    }

    /// Checks the values before anything connects, so a typo is `registry.invalid_config`
    /// rather than an envoy that retries forever.
    pub fn validate(&self) -> Result<()> {
        let endpoint = self.endpoint.trim();
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(Error::config(format!(
                "engine.endpoint must start with http:// or https://, not {:?}",
                self.endpoint
            )));
        }
        for (field, value) in [("namespace", &self.namespace), ("pool", &self.pool)] {
            if value.is_empty() || value.len() > 128 {
                return Err(Error::config(format!(
                    "engine.{field} must be 1 to 128 bytes long"
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_refuses_a_bad_endpoint_and_empty_names() {
        assert!(EngineConfig::new("http://127.0.0.1:6420")
            .validate()
            .is_ok());
        let err = EngineConfig::new("127.0.0.1:6420").validate().unwrap_err();
        assert_eq!((err.group(), err.code()), ("registry", "invalid_config"));
        let mut config = EngineConfig::new("http://127.0.0.1:6420");
        config.pool = String::new();
        let err = config.validate().unwrap_err();
        assert_eq!(err.code(), "invalid_config");
    }
}
