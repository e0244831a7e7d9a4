//! Reading a fuzz input as a script, and writing scripts for seeds.
//!
//! Reads never fail: past the end every number is 0 and every byte
//! string empty, so any input is a valid script and the fuzzer's
//! mutations keep their meaning wherever they land.

/// A cursor over the fuzzer's bytes.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.array())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.array())
    }
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        for b in &mut out {
            *b = self.u8();
        }
        out
    }
    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (out, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        out
    }
    /// A byte string with a 16-bit length.
    pub fn var(&mut self) -> &'a [u8] {
        let n = self.u16() as usize;
        self.bytes(n)
    }
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// Writes what [`Input`] reads.
#[derive(Default)]
pub struct Script(pub Vec<u8>);

impl Script {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn bool(&mut self, v: bool) -> &mut Self {
        self.u8(u8::from(v))
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.bytes(&v.to_be_bytes())
    }
    pub fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    pub fn var(&mut self, b: &[u8]) -> &mut Self {
        let n = u16::try_from(b.len()).expect("a script string fits 16 bits");
        self.u16(n).bytes(b)
    }
    pub fn finish(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.0)
    }
}

/// A stream id: with the high bit clear, one of `begun` (the ids the far
/// side has seen), else the input's own.
pub fn stream_id(inp: &mut Input<'_>, begun: &[u16]) -> u16 {
    let i = inp.u16();
    match begun.len() {
        0 => i,
        n if i & 0x8000 == 0 => begun[usize::from(i) % n],
        _ => i & 0x7fff,
    }
}
