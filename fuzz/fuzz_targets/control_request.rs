//! The control-socket request parser, and the line reader in front of it,
//! from arbitrary bytes.
//!
//! A request that parses must survive a round trip through its own wire
//! form; no input may panic, and the line reader never returns more than
//! its limit.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vblkcache::control::protocol::{parse_request, read_line, Line, Reply};

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_request(data) {
        let line = req.to_line();
        assert!(!line.contains('\n'));
        assert_eq!(parse_request(line.as_bytes()).ok(), Some(req));
    }
    // Replies are parsed by the client from the daemon; just no panic.
    let _ = Reply::parse(data);
    // The same bytes as a stream of lines, with a small limit.
    let mut r = std::io::BufReader::with_capacity(16, data);
    for _ in 0..64 {
        match read_line(&mut r, 32) {
            Ok(Line::Data(l)) => {
                assert!(l.len() <= 32);
                let _ = parse_request(&l);
            }
            Ok(_) | Err(_) => break,
        }
    }
});
