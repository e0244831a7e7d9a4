#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| allium_fuzz::service_descriptor::run(data));
