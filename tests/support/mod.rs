//! Support code shared by the integration tests, one concern a module:
//!
//! - [`spy`]: a driver over the sim device that records what the device has
//!   proven complete, and the driver's own accounting;
//! - [`ops`]: the op vocabulary of a random workload and the generator its
//!   words come from;
//! - [`ledger`]: the stream-safety ledger, what was freed where and when, and
//!   the check that no range goes to another stream before its free is
//!   proven complete;
//! - [`model`]: the reference model of the allocator, checked op by op;
//! - [`native`]: building the cdylib, and the C and C++ programs that link it.
//!
//! Each test binary compiles this whole tree and uses only part of it, so
//! each `mod support;` line carries `#[allow(dead_code)]`. Nothing inside
//! the tree allows it, and every item here is used by at least one test
//! binary (build with those attributes removed to list what each one skips).

pub mod ledger;
pub mod model;
pub mod native;
pub mod ops;
pub mod spy;
