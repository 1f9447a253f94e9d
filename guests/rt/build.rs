include!("../../crates/guest-sdk/build-guest.rs");
