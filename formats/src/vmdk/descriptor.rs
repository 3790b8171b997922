//! The VMDK text descriptor: the `createType`, CIDs, the parent hint and the extent lines,
//! read the way QEMU reads them (substring searches and `sscanf`-style extent lines), and
//! the descriptor QEMU writes for a new image.

/// Bytes of descriptor QEMU reads for the CIDs and the parent hint (20 sectors).
pub const DESC_SIZE: usize = 20 * 512;

/// One `RW <sectors> <TYPE> "<file>" [offset]` line QEMU accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtentLine {
    /// size in sectors (used for flat extents; sparse ones use their header's capacity)
    pub sectors: u64,
    /// `FLAT`, `SPARSE`, `VMFS`, `VMFSSPARSE` or `SESPARSE`
    pub kind: String,
    /// file name as written (relative to the descriptor's directory unless absolute)
    pub file: String,
    /// start of the data in a flat extent's file, in sectors
    pub flat_offset: u64,
}

/// The part of a text up to its first NUL (QEMU handles descriptors as C strings).
pub fn c_str(buf: &[u8]) -> &[u8] {
    match buf.iter().position(|&b| b == 0) {
        Some(n) => &buf[..n],
        None => buf,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The quoted value after `name="` (QEMU's `vmdk_parse_description`), at most `max` bytes.
pub fn quoted_value(desc: &[u8], name: &str, max: usize) -> Option<String> {
    let p = find(desc, name.as_bytes())? + name.len() + 2;
    if p >= desc.len() {
        return None;
    }
    let rest = &desc[p..];
    let end = rest.iter().position(|&b| b == b'"')?;
    if end + 1 > max {
        return None;
    }
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// The CID (`parent == false`) or parent CID, as QEMU finds it: the first occurrence of
/// `CID` (or `parentCID`), skip the name and one more byte, then a hexadecimal number.
pub fn read_cid(desc: &[u8], parent: bool) -> Option<u32> {
    let name: &[u8] = if parent { b"parentCID" } else { b"CID" };
    let p = find(desc, name)? + name.len() + 1;
    let rest = desc.get(p..)?;
    let mut s = Scanner { s: rest, i: 0 };
    s.skip_ws();
    let neg = s.eat(b'-');
    if !neg {
        s.eat(b'+');
    }
    if s.peek() == Some(b'0') && matches!(s.s.get(s.i + 1), Some(b'x' | b'X')) {
        if !s.s.get(s.i + 2).is_some_and(|c| c.is_ascii_hexdigit()) {
            return Some(0);
        }
        s.i += 2;
    }
    let start = s.i;
    while s.peek().is_some_and(|c| c.is_ascii_hexdigit()) {
        s.i += 1;
    }
    if s.i == start {
        return None;
    }
    let digits = std::str::from_utf8(&rest[start..s.i]).ok()?;
    // sscanf("%x") into a 32-bit value: strtoul (64 bits, saturating), then truncated.
    let v = u64::from_str_radix(digits, 16).unwrap_or(u64::MAX);
    let v = if neg { v.wrapping_neg() } else { v };
    Some(v as u32)
}

/// A `parentFileNameHint` without its closing quote, or too long.
#[derive(Debug, PartialEq, Eq)]
pub struct BadHint;

/// `parentFileNameHint="..."`: `Ok(None)` when absent, `Err` when unterminated.
pub fn parent_hint(desc: &[u8]) -> Result<Option<String>, BadHint> {
    let name = b"parentFileNameHint";
    let Some(p) = find(desc, name) else {
        return Ok(None);
    };
    let start = p + name.len() + 2;
    let rest = desc.get(start..).ok_or(BadHint)?;
    let end = rest.iter().position(|&b| b == b'"').ok_or(BadHint)?;
    if end > 4095 {
        return Err(BadHint);
    }
    Ok(Some(String::from_utf8_lossy(&rest[..end]).into_owned()))
}

/// A tiny `sscanf` over bytes: whitespace is what C's `isspace` says.
struct Scanner<'a> {
    s: &'a [u8],
    i: usize,
}

impl Scanner<'_> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(c) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn skip_ws(&mut self) {
        while self
            .peek()
            .is_some_and(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
        {
            self.i += 1;
        }
    }
    /// `%Ns`
    fn word(&mut self, max: usize) -> Option<String> {
        self.skip_ws();
        let start = self.i;
        while self.i - start < max
            && self
                .peek()
                .is_some_and(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c))
        {
            self.i += 1;
        }
        (self.i > start).then(|| String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }
    /// `%lld` (saturating, as strtoll)
    fn int(&mut self) -> Option<i64> {
        self.skip_ws();
        let save = self.i;
        let neg = self.eat(b'-');
        if !neg {
            self.eat(b'+');
        }
        let start = self.i;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.i += 1;
        }
        if self.i == start {
            self.i = save;
            return None;
        }
        let digits = std::str::from_utf8(&self.s[start..self.i]).ok()?;
        let v = digits
            .parse::<i64>()
            .unwrap_or(if neg { i64::MIN } else { i64::MAX });
        Some(if neg { v.saturating_neg() } else { v })
    }
}

/// Why an extent line was refused (QEMU: `Invalid extent line: ...`).
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidLine(pub String);

/// Parse the extent lines of a descriptor as QEMU does: lines whose access is not `RW`,
/// whose type is unknown (`ZERO` included) or whose size is not positive are skipped; a
/// FLAT line needs an offset, a VMFS line must have none, other types none either.
/// Returns the lines before the first invalid one, and that one (QEMU opens the extents
/// of the lines before it first, so their errors come first).
pub fn extent_lines(desc: &[u8]) -> (Vec<ExtentLine>, Option<InvalidLine>) {
    let mut out = Vec::new();
    let err = parse_lines(desc, &mut out).err();
    (out, err)
}

fn parse_lines(desc: &[u8], out: &mut Vec<ExtentLine>) -> Result<(), InvalidLine> {
    let mut p = 0;
    while p < desc.len() {
        let line_end = desc[p..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(desc.len(), |n| p + n + 1);
        let mut s = Scanner {
            s: &desc[p..],
            i: 0,
        };
        // "%10s %lld %10s \"%511[^\n\r\"]\" %lld"
        let mut matches = 0;
        let mut sectors = 0i64;
        let mut kind = String::new();
        let mut fname = String::new();
        let mut flat_offset = -1i64;
        let access = s.word(10);
        if let Some(a) = &access {
            let _ = a;
            matches += 1;
            if let Some(n) = s.int() {
                sectors = n;
                matches += 1;
                if let Some(k) = s.word(10) {
                    kind = k;
                    matches += 1;
                    s.skip_ws();
                    if s.eat(b'"') {
                        let start = s.i;
                        while s.i - start < 511
                            && s.peek().is_some_and(|c| !matches!(c, b'\n' | b'\r' | b'"'))
                        {
                            s.i += 1;
                        }
                        if s.i > start {
                            fname = String::from_utf8_lossy(&s.s[start..s.i]).into_owned();
                            matches += 1;
                            if s.eat(b'"') {
                                if let Some(o) = s.int() {
                                    flat_offset = o;
                                    matches += 1;
                                }
                            }
                        }
                    }
                }
            }
        }
        let this = p;
        p = line_end;
        if matches < 4 || access.as_deref() != Some("RW") {
            continue;
        }
        let invalid = || {
            let end = if desc[line_end - 1] == b'\n' {
                line_end - 1
            } else {
                line_end
            };
            InvalidLine(String::from_utf8_lossy(&desc[this..end]).into_owned())
        };
        match kind.as_str() {
            "FLAT" if matches != 5 || flat_offset < 0 => return Err(invalid()),
            "FLAT" => {}
            "VMFS" => {
                if matches == 4 {
                    flat_offset = 0;
                } else {
                    return Err(invalid());
                }
            }
            _ if matches != 4 => return Err(invalid()),
            _ => {}
        }
        if sectors <= 0
            || !matches!(
                kind.as_str(),
                "FLAT" | "SPARSE" | "VMFS" | "VMFSSPARSE" | "SESPARSE"
            )
        {
            continue;
        }
        out.push(ExtentLine {
            sectors: sectors as u64,
            kind,
            file: fname,
            flat_offset: flat_offset.max(0) as u64,
        });
    }
    Ok(())
}

/// What QEMU's create writes into a new descriptor.
pub struct NewDescriptor<'a> {
    /// CID (random in QEMU)
    pub cid: u32,
    /// parent CID (`ffffffff` without a parent)
    pub parent_cid: u32,
    /// subformat name
    pub create_type: &'a str,
    /// `parentFileNameHint`, if any
    pub parent_hint: Option<&'a str>,
    /// extent lines, each ending in a newline
    pub extents: &'a str,
    /// `ddb.virtualHWVersion`
    pub hw_version: &'a str,
    /// virtual size in bytes (for the geometry)
    pub size: u64,
    /// adapter type name
    pub adapter: &'a str,
    /// `ddb.toolsVersion`
    pub tools_version: &'a str,
}

impl NewDescriptor<'_> {
    /// The descriptor text, laid out as QEMU writes it.
    pub fn text(&self) -> String {
        let heads: u64 = if self.adapter == "ide" { 16 } else { 255 };
        let parent = match self.parent_hint {
            Some(h) => format!("parentFileNameHint=\"{h}\""),
            None => String::new(),
        };
        format!(
            "# Disk DescriptorFile\nversion=1\nCID={:x}\nparentCID={:x}\ncreateType=\"{}\"\n{}\n\
             # Extent description\n{}\n# The Disk Data Base\n#DDB\n\n\
             ddb.virtualHWVersion = \"{}\"\nddb.geometry.cylinders = \"{}\"\n\
             ddb.geometry.heads = \"{}\"\nddb.geometry.sectors = \"63\"\n\
             ddb.adapterType = \"{}\"\nddb.toolsVersion = \"{}\"\n",
            self.cid,
            self.parent_cid,
            self.create_type,
            parent,
            self.extents,
            self.hw_version,
            self.size / (63 * heads * 512),
            heads,
            self.adapter,
            self.tools_version,
        )
    }
}

/// Replace the CID in a descriptor buffer as QEMU does on the first write after open:
/// the value after the first `CID=` becomes `cid`, followed by everything from
/// `parentCID` on. Returns `None` when the buffer has no `parentCID`.
pub fn with_new_cid(desc: &[u8], cid: u32) -> Option<Vec<u8>> {
    let text = c_str(desc);
    let tail = find(text, b"parentCID")?;
    let p = find(text, b"CID")? + 4;
    let mut out = text[..p.min(text.len())].to_vec();
    out.extend_from_slice(format!("{cid:x}\n").as_bytes());
    out.extend_from_slice(&text[tail..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_lines_like_qemu() {
        let d = b"# x\nRW 2048 FLAT \"a b.raw\" 0\nRW 8 ZERO\nRDONLY 10 FLAT \"x\" 0\n\
                  RW 100 SPARSE \"s.vmdk\"\nRW 5 VMFS \"v\"\n";
        let (v, err) = extent_lines(d);
        assert!(err.is_none());
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].file, "a b.raw");
        assert_eq!(v[1].kind, "SPARSE");
        assert_eq!(v[2].flat_offset, 0);
        let bad = extent_lines(b"RW 2048 FLAT \"x\"\n").1.unwrap();
        assert_eq!(bad.0, "RW 2048 FLAT \"x\"");
    }

    #[test]
    fn cids_and_hints() {
        let d = b"version=1\nCID=fffffffe\nparentCID=ffffffff\nparentFileNameHint=\"b.vmdk\"\n";
        assert_eq!(read_cid(d, false), Some(0xffff_fffe));
        assert_eq!(read_cid(d, true), Some(0xffff_ffff));
        assert_eq!(parent_hint(d), Ok(Some("b.vmdk".into())));
        // Without a CID line the first "CID" is inside parentCID.
        assert_eq!(read_cid(b"parentCID=12\n", false), Some(0x12));
        assert_eq!(read_cid(b"CID=123456787\n", false), Some(0x2345_6787));
        assert_eq!(
            quoted_value(b"createType=\"monolithicFlat\"\n", "createType", 128),
            Some("monolithicFlat".into())
        );
        let n = with_new_cid(b"CID=1\nparentCID=ffffffff\nx\0\0", 0xab).unwrap();
        assert_eq!(n, b"CID=ab\nparentCID=ffffffff\nx");
    }
}
