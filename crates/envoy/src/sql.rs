//! The statements keel sends to the engine's remote SQLite, and reading the rows it returns.
//!
//! This is the one place that converts between keel's values and the protocol's
//! `SqliteBindParam` / `SqliteColumnValue`; everything above it speaks [`Value`] and
//! [`Statement`]. A column of an unexpected type is `storage.corrupt` for the actor: the engine
//! stores what keel wrote, so anything else is damage, never data to guess at.

use keel_core::{Error, Result};
use rivet_envoy_client::protocol;

/// One SQL value, as bound or as read.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    Null,
    Integer(i64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for Value {
    fn from(value: i64) -> Value {
        Value::Integer(value)
    }
}

impl From<&str> for Value {
    fn from(value: &str) -> Value {
        Value::Text(value.to_string())
    }
}

impl From<String> for Value {
    fn from(value: String) -> Value {
        Value::Text(value)
    }
}

impl From<Vec<u8>> for Value {
    fn from(value: Vec<u8>) -> Value {
        Value::Blob(value)
    }
}

impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(value: Option<T>) -> Value {
        value.map_or(Value::Null, Into::into)
    }
}

/// One statement of a batch.
#[derive(Debug, Clone)]
pub(crate) struct Statement {
    pub sql: &'static str,
    pub params: Vec<Value>,
}

impl Statement {
    pub fn new(sql: &'static str, params: Vec<Value>) -> Statement {
        Statement { sql, params }
    }

    /// Roughly how many bytes the statement takes as sent.
    pub fn size(&self) -> usize {
        let params: usize = self
            .params
            .iter()
            .map(|param| match param {
                Value::Null | Value::Integer(_) => 9,
                Value::Text(text) => text.len() + 4,
                Value::Blob(blob) => blob.len() + 4,
            })
            .sum();
        self.sql.len() + params + 16
    }

    /// A statement without parameters.
    pub fn plain(sql: &'static str) -> Statement {
        Statement::new(sql, Vec::new())
    }

    pub fn into_protocol(self) -> protocol::SqliteBatchStatement {
        let params = self.params.into_iter().map(bind).collect::<Vec<_>>();
        protocol::SqliteBatchStatement {
            sql: self.sql.to_string(),
            params: (!params.is_empty()).then_some(params),
        }
    }
}

fn bind(value: Value) -> protocol::SqliteBindParam {
    use protocol::SqliteBindParam as Bind;
    match value {
        Value::Null => Bind::SqliteValueNull,
        Value::Integer(value) => Bind::SqliteValueInteger(protocol::SqliteValueInteger { value }),
        Value::Text(value) => Bind::SqliteValueText(protocol::SqliteValueText { value }),
        Value::Blob(value) => Bind::SqliteValueBlob(protocol::SqliteValueBlob { value }),
    }
}

/// The rows of one statement's result, read column by column with the actor's id for errors.
pub(crate) struct Rows<'a> {
    actor_id: &'a str,
    rows: Vec<Vec<protocol::SqliteColumnValue>>,
}

impl<'a> Rows<'a> {
    pub fn new(actor_id: &'a str, result: protocol::SqliteExecuteResult) -> Rows<'a> {
        Rows {
            actor_id,
            rows: result.rows,
        }
    }

    /// Each row as values, checked to have `width` columns.
    pub fn values(self, width: usize) -> Result<Vec<Vec<Value>>> {
        let actor_id = self.actor_id;
        self.rows
            .into_iter()
            .map(|row| {
                if row.len() != width {
                    return Err(damage(
                        actor_id,
                        format!("a row has {} columns, not {width}", row.len()),
                    ));
                }
                row.into_iter()
                    .map(|column| read(actor_id, column))
                    .collect()
            })
            .collect()
    }
}

fn read(actor_id: &str, column: protocol::SqliteColumnValue) -> Result<Value> {
    use protocol::SqliteColumnValue as Column;
    match column {
        Column::SqliteValueNull => Ok(Value::Null),
        Column::SqliteValueInteger(value) => Ok(Value::Integer(value.value)),
        Column::SqliteValueText(value) => Ok(Value::Text(value.value)),
        Column::SqliteValueBlob(value) => Ok(Value::Blob(value.value)),
        Column::SqliteValueFloat(_) => Err(damage(actor_id, "a column holds a float")),
    }
}

impl Value {
    pub fn integer(self, actor_id: &str, what: &str) -> Result<i64> {
        match self {
            Value::Integer(value) => Ok(value),
            other => Err(damage(
                actor_id,
                format!("{what} is {}, not an integer", other.kind()),
            )),
        }
    }

    pub fn text(self, actor_id: &str, what: &str) -> Result<String> {
        match self {
            Value::Text(value) => Ok(value),
            other => Err(damage(
                actor_id,
                format!("{what} is {}, not text", other.kind()),
            )),
        }
    }

    /// A `BLOB NOT NULL` column. The engine answers an empty blob as null (observed with
    /// engine 2.3.19), so null reads as empty here; the constraint rules out a real null.
    pub fn blob(self, actor_id: &str, what: &str) -> Result<Vec<u8>> {
        Ok(self.optional_blob(actor_id, what)?.unwrap_or_default())
    }

    /// A nullable blob column. An empty blob reads as `None` (see [`Value::blob`]); keel never
    /// stores an empty value there (state and input are encoded values, never empty).
    pub fn optional_blob(self, actor_id: &str, what: &str) -> Result<Option<Vec<u8>>> {
        match self {
            Value::Blob(value) => Ok(Some(value)),
            Value::Null => Ok(None),
            other => Err(damage(
                actor_id,
                format!("{what} is {}, not a blob", other.kind()),
            )),
        }
    }

    pub fn optional_text(self, actor_id: &str, what: &str) -> Result<Option<String>> {
        match self {
            Value::Null => Ok(None),
            other => other.text(actor_id, what).map(Some),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Integer(_) => "an integer",
            Value::Text(_) => "text",
            Value::Blob(_) => "a blob",
        }
    }
}

/// Damage in one actor's stored data.
pub(crate) fn damage(actor_id: &str, detail: impl std::fmt::Display) -> Error {
    Error::StorageCorrupt {
        detail: format!("the engine-stored data of actor {actor_id} is damaged: {detail}"),
        actor_id: Some(actor_id.to_string()),
        source: None,
    }
}
