#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| allium_fuzz::relay_msg::run(data));
