//! The agent's `config` request payload (JSON from the network): any bytes
//! are refused with a reason or read, and what is read writes and reads back.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = tunnel::wire::AgentConfig::from_json(data) {
        let again = tunnel::wire::AgentConfig::from_json(&config.to_json());
        assert!(again.is_ok(), "a config it read does not read back");
    }
});
