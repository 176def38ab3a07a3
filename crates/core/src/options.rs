//! The numeric options a host's users set (`setup()` in TypeScript), defined once: each one's
//! name, default, range, environment variable, unit and meaning.
//!
//! The binding converts `setup()` options into a [`RuntimeConfig`](crate::RuntimeConfig) and
//! checks every number against [`OptionSpec::check`]; it also hands the table to TypeScript,
//! which checks the same ranges before anything crosses (a number that is not whole never
//! reaches Rust intact) and reads its defaults from here. So a range or a default changes in
//! this file only. Every default comes from `config.rs`, where the runtime itself reads it.

use crate::config::{
    DEFAULT_ACTION_TIMEOUT, DEFAULT_BODY_TIMEOUT, DEFAULT_DRAIN_TIMEOUT, DEFAULT_HOOK_TIMEOUT,
    DEFAULT_LINGER, DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_KEY_BYTES, DEFAULT_MAX_KEY_SEGMENT_BYTES,
    DEFAULT_MAX_MAILBOX_LEN, DEFAULT_PORT, DEFAULT_SLEEP_TIMEOUT,
};
use crate::error::{Error, Result};

/// The largest value of a numeric option other than `port`: the binding carries them as
/// 32-bit unsigned numbers.
pub const MAX_OPTION_VALUE: u64 = u32::MAX as u64;

/// How long a signal-triggered shutdown may take before the TypeScript layer re-raises the
/// signal; it must exceed the drain timeout. Core does not use it; it is here so that every
/// default is defined in one table.
pub const DEFAULT_GRACE_PERIOD_MS: u64 = 30_000;

/// One numeric option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionSpec {
    /// The option's name in `setup()`, such as `drainTimeoutMs`.
    pub name: &'static str,
    /// Its default.
    pub default: u64,
    /// The smallest value allowed.
    pub min: u64,
    /// The largest value allowed.
    pub max: u64,
    /// The environment variable it falls back to, if any.
    pub env: Option<&'static str>,
    /// What it counts: `ms`, `bytes`, `messages` or `port`.
    pub unit: &'static str,
    /// What it does, in one sentence.
    pub doc: &'static str,
}

const fn ms(duration: std::time::Duration) -> u64 {
    duration.as_millis() as u64
}

/// Every numeric option of `setup()`, in the order the docs list them.
pub const NUMERIC_OPTIONS: &[OptionSpec] = &[
    OptionSpec {
        name: "port",
        default: DEFAULT_PORT as u64,
        min: 0,
        max: u16::MAX as u64,
        env: Some("KEEL_PORT"),
        unit: "port",
        doc: "Port to listen on; 0 picks a free one.",
    },
    OptionSpec {
        name: "drainTimeoutMs",
        default: ms(DEFAULT_DRAIN_TIMEOUT),
        min: 0,
        max: MAX_OPTION_VALUE,
        env: None,
        unit: "ms",
        doc: "Bound on the whole graceful drain; 0 forces it at once.",
    },
    OptionSpec {
        name: "gracePeriodMs",
        default: DEFAULT_GRACE_PERIOD_MS,
        min: 1,
        max: MAX_OPTION_VALUE,
        env: None,
        unit: "ms",
        doc: "How long a signal-triggered shutdown may take before the signal is re-raised; must exceed drainTimeoutMs.",
    },
    OptionSpec {
        name: "actionTimeoutMs",
        default: ms(DEFAULT_ACTION_TIMEOUT),
        min: 1,
        max: MAX_OPTION_VALUE,
        env: None,
        unit: "ms",
        doc: "Time an action (or onRequest) may run before it fails with actor.action_timed_out.",
    },
    OptionSpec {
        name: "hookTimeoutMs",
        default: ms(DEFAULT_HOOK_TIMEOUT),
        min: 1,
        max: MAX_OPTION_VALUE,
        env: None,
        unit: "ms",
        doc: "Time one lifecycle hook may take before it fails with actor.hook_timed_out.",
    },
    OptionSpec {
        name: "sleepTimeoutMs",
        default: ms(DEFAULT_SLEEP_TIMEOUT),
        min: 1,
        max: MAX_OPTION_VALUE,
        env: None,
        unit: "ms",
        doc: "Idle time before an actor without connections sleeps.",
    },
    OptionSpec {
        name: "maxBodyBytes",
        default: DEFAULT_MAX_BODY_BYTES as u64,
        min: 1,
        max: MAX_OPTION_VALUE,
        env: None,
        unit: "bytes",
        doc: "Largest accepted HTTP request body.",
    },
    OptionSpec {
        name: "maxMailboxLen",
        default: DEFAULT_MAX_MAILBOX_LEN as u64,
        min: 1,
        max: MAX_OPTION_VALUE,
        env: None,
        unit: "messages",
        doc: "Messages one actor may hold queued before callers get actor.overloaded.",
    },
    OptionSpec {
        name: "maxKeySegmentBytes",
        default: DEFAULT_MAX_KEY_SEGMENT_BYTES as u64,
        min: 1,
        max: MAX_OPTION_VALUE,
        env: None,
        unit: "bytes",
        doc: "Largest key segment, in bytes of UTF-8.",
    },
    OptionSpec {
        name: "maxKeyBytes",
        default: DEFAULT_MAX_KEY_BYTES as u64,
        min: 1,
        max: MAX_OPTION_VALUE,
        env: None,
        unit: "bytes",
        doc: "Largest key, in bytes of its canonical string.",
    },
    OptionSpec {
        name: "bodyTimeoutMs",
        default: ms(DEFAULT_BODY_TIMEOUT),
        min: 1,
        max: MAX_OPTION_VALUE,
        env: None,
        unit: "ms",
        doc: "Time a request body may take to arrive before request.body_timed_out.",
    },
    OptionSpec {
        name: "lingerMs",
        default: ms(DEFAULT_LINGER),
        min: 0,
        max: MAX_OPTION_VALUE,
        env: None,
        unit: "ms",
        doc: "How long a closing connection reads and discards what the client still sends; 0 closes at once.",
    },
];

/// The option named `name`, if it is a numeric option.
pub fn spec(name: &str) -> Option<&'static OptionSpec> {
    NUMERIC_OPTIONS.iter().find(|spec| spec.name == name)
}

/// The option named `name`; a name not in [`NUMERIC_OPTIONS`] is a bug in the caller.
fn known(name: &str) -> Result<&'static OptionSpec> {
    spec(name).ok_or_else(|| Error::config(format!("{name} is not a numeric option")))
}

impl OptionSpec {
    /// The message for a value out of this option's range (or not a whole number), naming the
    /// option as `label` (the option's name, or a path such as `use.room.options.x`).
    pub fn out_of_range(&self, label: &str, shown: &str) -> Error {
        Error::config(format!(
            "{label} must be a whole number from {} to {}, not {shown}",
            self.min, self.max
        ))
    }

    /// Checks `value` against the range: `registry.invalid_config` naming `label` if outside.
    pub fn check_as(&self, label: &str, value: u64) -> Result<u64> {
        if (self.min..=self.max).contains(&value) {
            Ok(value)
        } else {
            Err(self.out_of_range(label, &value.to_string()))
        }
    }
}

/// Checks `value` for the option `name`.
pub fn check(name: &str, value: u64) -> Result<u64> {
    known(name)?.check_as(name, value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_lie_in_their_ranges_and_names_are_unique() {
        for spec in NUMERIC_OPTIONS {
            assert!(
                spec.min <= spec.default && spec.default <= spec.max,
                "{spec:?}"
            );
            assert_eq!(
                NUMERIC_OPTIONS
                    .iter()
                    .filter(|s| s.name == spec.name)
                    .count(),
                1
            );
        }
        assert!(spec("gracePeriodMs").unwrap().default > spec("drainTimeoutMs").unwrap().default);
    }

    #[test]
    fn a_value_out_of_range_names_the_option_and_the_range() {
        assert_eq!(check("port", 65535).unwrap(), 65535);
        let err = check("port", 70000).unwrap_err();
        assert_eq!((err.group(), err.code()), ("registry", "invalid_config"));
        assert!(
            err.to_string()
                .ends_with("port must be a whole number from 0 to 65535, not 70000"),
            "{err}"
        );
        assert!(check("actionTimeoutMs", 0).is_err());
        assert_eq!(check("lingerMs", 0).unwrap(), 0);
    }
}
