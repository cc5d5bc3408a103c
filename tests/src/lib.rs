//! Shared pieces of the integration tests: fixture images built with debootstrap (cached
//! between runs), the imgforge binary under test, and read-back of results that does not use
//! imgforge (loop mounts made by the test itself).

pub mod crafted;
pub mod deb;
pub mod fixtures;
pub mod http;
pub mod package;
pub mod readback;
pub mod rpm;
pub mod run;
pub mod stand_in;
