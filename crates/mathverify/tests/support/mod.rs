//! Helpers shared by mathverify's tests and examples.

pub mod cases;
