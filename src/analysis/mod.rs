//! Pure functions over captured summaries (no model needed).

pub mod attractors;
