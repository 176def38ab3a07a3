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

    /// The engine settings from explicit options, each falling back to its environment
    /// variable (`KEEL_ENGINE_ENDPOINT`, `KEEL_ENGINE_NAMESPACE`, `KEEL_ENGINE_POOL`,
    /// `KEEL_ENGINE_TOKEN`, read through `env`) and then to its default. `None` without an
    /// endpoint: keel runs embedded. An empty value counts as unset.
    pub fn resolve(
        endpoint: Option<String>,
        namespace: Option<String>,
        pool: Option<String>,
        token: Option<String>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<EngineConfig>> {
        let pick = |value: Option<String>, name: &str| {
            value
                .filter(|value| !value.is_empty())
                .or_else(|| env(name).filter(|value| !value.is_empty()))
        };
        let Some(endpoint) = pick(endpoint, "KEEL_ENGINE_ENDPOINT") else {
            return Ok(None);
        };
        let config = EngineConfig {
            endpoint,
            namespace: pick(namespace, "KEEL_ENGINE_NAMESPACE")
                .unwrap_or_else(|| DEFAULT_NAMESPACE.to_string()),
            pool: pick(pool, "KEEL_ENGINE_POOL").unwrap_or_else(|| DEFAULT_POOL.to_string()),
            token: pick(token, "KEEL_ENGINE_TOKEN"),
        };
        config.validate()?;
        Ok(Some(config))
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

    #[test]
    fn resolve_prefers_options_then_the_environment_then_defaults() {
        let env = |name: &str| match name {
            "KEEL_ENGINE_ENDPOINT" => Some("http://127.0.0.1:7000".to_string()),
            "KEEL_ENGINE_POOL" => Some("env-pool".to_string()),
            _ => None,
        };
        let none = |_: &str| None;
        assert_eq!(
            EngineConfig::resolve(None, None, None, None, none).unwrap(),
            None
        );
        let config = EngineConfig::resolve(None, None, None, None, env)
            .unwrap()
            .unwrap();
        assert_eq!(config.endpoint, "http://127.0.0.1:7000");
        assert_eq!(config.namespace, DEFAULT_NAMESPACE);
        assert_eq!(config.pool, "env-pool");
        assert_eq!(config.token, None);
        let config = EngineConfig::resolve(
            Some("http://127.0.0.1:6420".into()),
            Some("ns".into()),
            Some("p".into()),
            Some("t".into()),
            env,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (
                config.endpoint.as_str(),
                config.namespace.as_str(),
                config.pool.as_str()
            ),
            ("http://127.0.0.1:6420", "ns", "p")
        );
        assert_eq!(config.token.as_deref(), Some("t"));
        let err =
            EngineConfig::resolve(Some("ftp://x".into()), None, None, None, none).unwrap_err();
        assert_eq!((err.group(), err.code()), ("registry", "invalid_config"));
    }
}
