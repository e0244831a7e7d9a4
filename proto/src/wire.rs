//! Byte cursors for every parser and encoder in this crate.
//!
//! Parsers never index slices by hand: they take bytes from a [`Reader`],
//! which reports "truncated" separately from "malformed" so that stream
//! codecs can ask for more input.

use crate::Error;

/// Declare an open wire enum: a newtype over an integer with named
/// constants, so unknown values survive parsing and `Debug` prints names.
#[macro_export]
macro_rules! open_enum {
    ($(#[$m:meta])* $name:ident($int:ty) { $($(#[$vm:meta])* $var:ident = $val:expr),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub $int);
        impl $name {
            $($(#[$vm])* pub const $var: Self = Self($val);)+
            /// The constant's name, if the value has one.
            pub fn name(self) -> Option<&'static str> {
                match self {
                    $(Self::$var => Some(stringify!($var)),)+
                    _ => None,
                }
            }
        }
        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}({})", stringify!($name), self.0),
                }
            }
        }
    };
}

/// A cursor over bytes received from a peer.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    pub fn consumed(&self) -> usize {
        self.pos
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Error> {
        if self.remaining() < n {
            return Err(Error::Truncated);
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
    pub fn take_array<const N: usize>(&mut self) -> Result<[u8; N], Error> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    pub fn take_u8(&mut self) -> Result<u8, Error> {
        Ok(self.take(1)?[0])
    }
    pub fn take_u16(&mut self) -> Result<u16, Error> {
        Ok(u16::from_be_bytes(self.take_array()?))
    }
    pub fn take_u32(&mut self) -> Result<u32, Error> {
        Ok(u32::from_be_bytes(self.take_array()?))
    }
    pub fn take_rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }
    /// Fails with [`Error::TrailingBytes`] unless everything was consumed.
    pub fn should_be_exhausted(&self) -> Result<(), Error> {
        if self.remaining() != 0 {
            return Err(Error::TrailingBytes(self.remaining()));
        }
        Ok(())
    }
}

/// An append-only encoder.
#[derive(Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    pub fn new() -> Self {
        Writer::default()
    }
    pub fn put(&mut self, b: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(b);
        self
    }
    pub fn put_u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }
    pub fn put_u16(&mut self, v: u16) -> &mut Self {
        self.put(&v.to_be_bytes())
    }
    pub fn put_u32(&mut self, v: u32) -> &mut Self {
        self.put(&v.to_be_bytes())
    }
    pub fn len(&self) -> usize {
        self.buf.len()
    }
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_enums_keep_unknown_values_and_print_names() {
        use crate::cell::{CellCmd, DestroyReason};
        assert_eq!(format!("{:?}", CellCmd::RELAY), "RELAY");
        assert_eq!(format!("{:?}", CellCmd(77)), "CellCmd(77)");
        assert_eq!(DestroyReason(13), DestroyReason::CELL_AUTH);
        assert_eq!(crate::relaymsg::RelayCmd(200).name(), None);
    }

    #[test]
    fn reader_truncation_and_trailing() {
        let mut r = Reader::new(&[1, 2, 3]);
        assert_eq!(r.take_u16().unwrap(), 0x0102);
        assert!(matches!(
            r.should_be_exhausted(),
            Err(Error::TrailingBytes(1))
        ));
        assert!(matches!(r.take_u16(), Err(Error::Truncated)));
        assert_eq!(r.take_u8().unwrap(), 3);
        r.should_be_exhausted().unwrap();
    }
}
