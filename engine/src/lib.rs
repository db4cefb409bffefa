//! Switchyard: a declarative pipeline engine that keeps retail ERP, POS and marketplace systems
//! in sync. A pipeline is YAML: source -> validate -> map -> route -> sinks. The modules follow it.

pub mod build;
pub mod config;
pub mod convert;
pub mod jsonpath;
pub mod map;
pub mod message;
pub mod pipeline;
pub mod registry;
pub mod route;
pub mod sink;
pub mod source;
pub mod template;
pub mod validate;
pub mod runtime;
pub mod testing;
pub mod schema;
