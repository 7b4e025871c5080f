//! Regression tests for what the simulation found that was not already
//! known (issue 13), each `#[ignore]`d until its fix lands.
