//! The map stage: an ordered list of steps that turn the input into the output record.

pub mod fields;
pub mod lookup;
