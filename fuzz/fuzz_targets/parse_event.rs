//! Any byte string is either a LoginEvent or a value-free Rejection: never a
//! panic, and never a reason that could carry part of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pii_vault::domain::LoginEvent;

fuzz_target!(|data: &[u8]| {
    match LoginEvent::parse(data) {
        Ok(ev) => {
            // Canonical IPs re-parse to themselves.
            let again = pii_vault::domain::CanonicalIp::parse(ev.ip.expose()).expect("canonical IP parses");
            assert_eq!(again.expose(), ev.ip.expose());
            assert!(ev.user_id.chars().count() <= 128);
        }
        Err(why) => {
            // Reasons come from a fixed vocabulary (`Rejection` carries no
            // strings), so they are short, printable and independent of the
            // input's size: a value that leaked into one would break that.
            let text = why.to_string();
            assert!(text.len() <= 64, "reason too long: {text}");
            assert!(text.bytes().all(|b| (0x20..0x7f).contains(&b)), "unprintable reason: {text}");
            assert!(!why.code().is_empty());
        }
    }
});
