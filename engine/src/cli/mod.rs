pub mod ops;
pub mod simulate;
