//! Pieces every command shares: the program name, error reporting, image opening.

use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use rimg_formats::opts::OptionMap;
use rimg_formats::{Access, Chain, OpenOptions};

static PROGNAME: OnceLock<String> = OnceLock::new();

/// Remember the name we were run as: `qemu-img` when installed in its place, so messages
/// carry the same prefix qemu-img's do.
pub fn set_progname(argv0: &str) {
    let base = std::path::Path::new(argv0)
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "rimg".into());
    let _ = PROGNAME.set(base);
}

/// The program name for messages.
pub fn progname() -> &'static str {
    PROGNAME.get().map(String::as_str).unwrap_or("rimg")
}

/// Print `prog: msg` on stderr (each line of a multi-line message as qemu prints it).
pub fn report(msg: &str) {
    eprintln!("{}: {msg}", progname());
}

/// An error that carries its exit code.
#[derive(Debug)]
pub struct Exit(pub i32);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}

impl std::error::Error for Exit {}

/// Exit with `code` without printing anything more.
pub fn exit_code(code: i32) -> anyhow::Error {
    anyhow!(Exit(code))
}

/// Where an image is and how to open it, from `-f`, `--image-opts` and the filename.
#[derive(Clone, Debug, Default)]
pub struct ImageSpec {
    /// path of the image file
    pub path: String,
    /// format, if given
    pub format: Option<String>,
    /// `file.locking=off`
    pub no_lock: bool,
    /// internal snapshot to read (`-l`)
    pub snapshot: Option<String>,
    /// id of the `--object secret` holding the image's key (`encrypt.key-secret`)
    pub key_secret: Option<String>,
    /// the `--image-opts` string, which QEMU names the image by in format-level errors
    pub opts_name: Option<String>,
}

impl ImageSpec {
    /// Resolve a filename argument: a plain path, or with `--image-opts` an option string
    /// such as `driver=raw,file.filename=disk.img`.
    pub fn resolve(arg: &str, format: Option<&str>, image_opts: bool) -> Result<ImageSpec> {
        if image_opts && format.is_some() {
            bail!("--image-opts and --format are mutually exclusive");
        }
        if !image_opts {
            if arg.is_empty() {
                bail!("Could not open '': The 'file' block driver requires a file name");
            }
            return Ok(ImageSpec {
                path: arg.to_string(),
                format: format.map(str::to_string),
                no_lock: false,
                snapshot: None,
                key_secret: None,
                opts_name: None,
            });
        }
        let mut m = OptionMap::parse(arg);
        let mut spec = ImageSpec {
            format: m.take("driver"),
            opts_name: Some(arg.to_string()),
            ..Default::default()
        };
        let file = m
            .take("file.filename")
            .or_else(|| m.take("filename"))
            .or_else(|| m.take("file"));
        if let Some(d) = m.take("file.driver") {
            if d != "file" && d != "host_device" {
                bail!("Unknown protocol driver '{d}': rimg supports 'file' and 'host_device'");
            }
        }
        spec.key_secret = m
            .take("encrypt.key-secret")
            .or_else(|| m.take("key-secret"));
        match m.take("file.locking").as_deref() {
            None | Some("auto") | Some("on") => {}
            Some("off") => spec.no_lock = true,
            Some(v) => bail!("Parameter 'locking' does not accept value '{v}'"),
        }
        if let Some((k, _)) = m.items().first() {
            bail!("Invalid option '{k}' in image options '{arg}'");
        }
        spec.path = file.ok_or_else(|| anyhow!("A block device must be specified for \"file\""))?;
        Ok(spec)
    }

    /// Open only the image itself, not its backing files (`info` without
    /// `--backing-chain`, as qemu-img opens with BDRV_O_NO_BACKING).
    pub fn open_top(&self, access: Access, force_share: bool) -> Result<Chain> {
        let opts = OpenOptions {
            access,
            force_share,
            no_lock: self.no_lock,
            snapshot: self.snapshot.clone(),
            check: false,
            key: self.key()?,
        };
        let (image, probed) =
            rimg_formats::chain::open_image(&self.path, self.format.as_deref(), &opts)
                .map_err(|e| anyhow!(open_message(self.error_name(&e), e)))?;
        Ok(Chain::single(image, &self.path, probed))
    }

    /// Open the image's whole chain for `access`.
    pub fn open_chain(&self, access: Access, force_share: bool) -> Result<Chain> {
        self.open_chain_for(access, force_share, false)
    }

    /// Open the image's whole chain for `access`; `check` opens it for `check` (QEMU's
    /// BDRV_O_CHECK: problems are left for the check to report).
    pub fn open_chain_for(&self, access: Access, force_share: bool, check: bool) -> Result<Chain> {
        let opts = OpenOptions {
            access,
            force_share,
            no_lock: self.no_lock,
            snapshot: self.snapshot.clone(),
            check,
            key: self.key()?,
        };
        let chain = Chain::open(&self.path, self.format.as_deref(), &opts)
            .map_err(|e| anyhow!(open_message(self.error_name(&e), e)))?;
        if opts.write() {
            warn_probed_raw(&chain);
        }
        Ok(chain)
    }
}

impl ImageSpec {
    /// The name an open error shows: the `--image-opts` string for errors of the format
    /// layer (QEMU names the node by its options there), else the path.
    fn error_name(&self, e: &rimg_formats::Error) -> &str {
        use rimg_formats::Error as E;
        match (&self.opts_name, e) {
            // Format-level errors name the node by its options, as qemu-img does.
            (Some(n), E::Unsupported(_) | E::InvalidArgument(_) | E::Corrupt { .. }) => n,
            _ => &self.path,
        }
    }

    /// The bytes of the image's key secret, if one was named.
    fn key(&self) -> Result<Option<Vec<u8>>> {
        match &self.key_secret {
            None => Ok(None),
            Some(id) => rimg_formats::crypto::secret(id)
                .map(Some)
                .ok_or_else(|| anyhow!("Could not open '{}': No secret with id '{id}'", self.path)),
        }
    }
}

/// Keep a `secret` object's bytes.
fn store_secret(m: &OptionMap) -> Result<()> {
    let id = m.get("id").unwrap_or_default().to_string();
    if m.get("keyid").is_some() || m.get("iv").is_some() {
        bail!("encrypted secrets (keyid/iv) are not supported by rimg yet");
    }
    let raw = match (m.get("data"), m.get("file")) {
        (Some(_), Some(_)) => bail!("'data' and 'file' are mutually exclusive"),
        (Some(d), None) => d.as_bytes().to_vec(),
        (None, Some(f)) => std::fs::read(f)
            .map_err(|e| anyhow!("Unable to read {f}: {}", rimg_formats::error::strerror(&e)))?,
        (None, None) => bail!("Either 'file' or 'data' must be provided"),
    };
    let bytes = match m.get("format") {
        None | Some("raw") => raw,
        Some("base64") => {
            use base64::Engine as _;
            let text: Vec<u8> = raw
                .into_iter()
                .filter(|c| !c.is_ascii_whitespace())
                .collect();
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| anyhow!("Invalid base64 data"))?
        }
        Some(f) => bail!("Parameter 'format' does not accept value '{f}'"),
    };
    rimg_formats::crypto::register_secret(&id, bytes);
    Ok(())
}

/// Word an open error as qemu-img does: `Could not open 'x': ...`.
pub fn open_message(path: &str, e: rimg_formats::Error) -> String {
    use rimg_formats::Error as E;
    match e {
        E::Open { .. } | E::Locked { .. } => format!("Could not open '{path}': {e}"),
        E::OpenWhy { .. } => e.to_string(),
        E::Corrupt { what, .. } => format!("Could not open '{path}': {what}"),
        E::InvalidArgument(m) | E::Unsupported(m) => format!("Could not open '{path}': {m}"),
        other => other.to_string(),
    }
}

/// qemu-img's warning when a raw image is opened for writing without `-f`.
pub fn warn_probed_raw(chain: &Chain) {
    let top = &chain.layers()[0];
    if top.probed && top.image.format() == "raw" {
        eprintln!(
            "WARNING: Image format was not specified for '{}' and probing guessed raw.\n         Automatically detecting the format is dangerous for raw images, write operations on block 0 will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions.",
            top.filename
        );
    }
}

/// Parse `--output`: `human` or `json` (anything else is a usage error of `cmd`).
pub fn output_format(cmd: &str, v: Option<&str>) -> Result<bool> {
    match v {
        None | Some("human") => Ok(false),
        Some("json") => Ok(true),
        Some(o) => Err(crate::cmd::usage_error(
            cmd,
            &format!("--output expects 'human' or 'json' not '{o}'"),
        )),
    }
}

/// Whether engine diagnostics were asked for (`--verbose` before the command, or
/// `RIMG_VERBOSE=1`).
pub fn verbose() -> bool {
    VERBOSE.load(std::sync::atomic::Ordering::Relaxed)
        || std::env::var_os("RIMG_VERBOSE").is_some_and(|v| v == "1")
}

/// Set by the global `--verbose` option.
pub static VERBOSE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// QOM object types qemu-img accepts with `--object`.
const OBJECT_TYPES: &[&str] = &[
    "secret",
    "secret_keyring",
    "iothread",
    "throttle-group",
    "tls-creds-anon",
    "tls-creds-psk",
    "tls-creds-x509",
    "tls-cipher-suites",
    "authz-simple",
    "authz-list",
    "authz-listfile",
    "authz-pam",
];

/// Validate an `--object` definition as qemu-img does (rimg keeps secrets for the formats
/// that need them; nothing else uses objects yet).
pub fn check_object(def: &str) -> Result<()> {
    let mut m = OptionMap::parse(def);
    let ty = match m.take("qom-type") {
        Some(t) => t,
        None => match m.items().first() {
            Some((k, v)) if v == "on" && !def.starts_with(&format!("{k}=")) => {
                let k = k.clone();
                m.take(&k);
                k
            }
            _ => bail!("Parameter 'qom-type' is missing"),
        },
    };
    if !OBJECT_TYPES.contains(&ty.as_str()) {
        bail!("Parameter 'qom-type' does not accept value '{ty}'");
    }
    if m.get("id").is_none() {
        bail!("Parameter 'id' is missing");
    }
    if ty == "secret" {
        store_secret(&m)?;
    }
    Ok(())
}

/// Parse a cache mode argument (`-t`/`-T`).
pub fn cache_mode(v: &str) -> Result<rimg_engine::CacheMode> {
    rimg_engine::CacheMode::parse(v).ok_or_else(|| anyhow!("Invalid cache option: {v}"))
}

/// Parse a source cache mode argument (`-T`), with qemu-img's wording for a bad one.
pub fn source_cache_mode(v: &str) -> Result<rimg_engine::CacheMode> {
    rimg_engine::CacheMode::parse(v).ok_or_else(|| anyhow!("Invalid source cache option: {v}"))
}

/// QEMU marks an image corrupt and prints this line (on stderr, without the program name)
/// when a lookup meets an inconsistent structure; rimg prints the same before failing.
pub fn report_corrupt(e: &rimg_formats::Error) -> bool {
    if let rimg_formats::Error::Corrupt { what, .. } = e {
        if what.starts_with("Cluster allocation offset") {
            eprintln!(
                "qcow2: Image is corrupt: {what}; further non-fatal corruption events will be suppressed"
            );
            return true;
        }
    }
    false
}
