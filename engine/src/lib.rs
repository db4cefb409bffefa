//! Switchyard: a declarative pipeline engine that keeps retail ERP, POS and marketplace systems
//! in sync. A pipeline is YAML: source -> validate -> map -> route -> sinks. The modules follow it.

// Diagnostics are large (a source file handle, spans, hints) but built only on cold paths: at load
// time, and for messages that already failed.
#![allow(clippy::result_large_err)]

pub mod amqp;
pub mod build;
pub mod config;
pub mod convert;
pub mod doc;
pub mod jsonpath;
pub mod map;
pub mod message;
pub mod pipeline;
pub mod registry;
pub mod route;
pub mod runtime;
pub mod schema;
pub mod sink;
pub mod source;
pub mod store;
pub mod template;
pub mod testing;
pub mod validate;
