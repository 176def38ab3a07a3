//! The server layer: keel's HTTP routes, the inspector and the accept loop.

pub mod http;
pub mod inspector;
pub mod linger;
