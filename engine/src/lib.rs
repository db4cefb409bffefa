pub mod build;
pub mod config;
pub mod convert;
pub mod jsonpath;
pub mod map;
pub mod message;
pub mod template;
pub mod validate;
