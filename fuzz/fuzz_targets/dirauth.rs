#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| allium_fuzz::dirauth::run(data));
