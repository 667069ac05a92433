//! A local key-encryption key in a file, for the embedded default.
//!
//! The file holds 32 random bytes (hex), is created with mode 0600 on first
//! use, and is never written anywhere else. Keys are wrapped with AES-256-GCM
//! under it, with the key's purpose in the associated data so that a vault
//! key cannot be unwrapped as a token key.

use std::io::Write;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use zeroize::Zeroizing;

use crate::crypto::aead::{self, Aad, NONCE_LEN};
use crate::crypto::envelope::{KeyMaterial, KeyPurpose, KeyWrapper, WrapError, WrappedKey};
use crate::crypto::token::fingerprint;

pub const KEK_FILE: &str = "local-kek.key";

pub struct LocalKek {
    kek: KeyMaterial,
    kek_id: String,
    path: PathBuf,
}

impl LocalKek {
    /// Opens `dir/local-kek.key`, creating it (and `dir`) if missing.
    ///
    /// The file is opened first and checked afterwards, on the open handle
    /// (never by its path, which could be swapped between the check and the
    /// read), and a symbolic link is refused rather than followed: whoever
    /// can plant a link in the key directory must not be able to point the
    /// key at a file of their choosing, or have it read from somewhere
    /// they can read as well.
    pub fn open_or_create(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(KEK_FILE);
        let kek = match open_key_file(&path)? {
            Some(file) => read_key_file(&path, file)?,
            None => {
                let kek = KeyMaterial::generate();
                write_new_key_file(dir, &path, &kek)?;
                tracing::warn!(
                    path = %path.display(),
                    "created a local key-encryption key: fine for development and small single-node use, \
                     not for production (use --kms-key-id); back it up, without it the vault cannot be read"
                );
                kek
            }
        };
        let kek_id = format!("local:{}", fingerprint(&kek));
        Ok(LocalKek { kek, kek_id, path })
    }

    /// Opens `dir/local-kek.key`, which must exist: for every command but
    /// those that set a store up (`run`, `migrate`, `keys init`), a missing
    /// key file means the wrong directory or `--key-dir`, and a new key
    /// would wrap nothing that is stored.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join(KEK_FILE);
        let Some(file) = open_key_file(&path)? else {
            anyhow::bail!(
                "no local key file at {} (run from the directory that holds keys/, or pass --key-dir / \
                 PII_VAULT_KEY_DIR, or --kms-key-id for AWS KMS; `pii-vault run`, `migrate` or `keys init` \
                 creates one); nothing was created or recorded",
                path.display()
            );
        };
        let kek = read_key_file(&path, file)?;
        let kek_id = format!("local:{}", fingerprint(&kek));
        Ok(LocalKek { kek, kek_id, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn aad<'a>(&'a self, purpose: KeyPurpose) -> Aad<'a> {
        Aad {
            kind: "wrap",
            message_id: purpose.context(),
            user_id: "",
            key_id: &self.kek_id,
        }
    }

    fn wrap(&self, purpose: KeyPurpose, key: &KeyMaterial) -> Result<WrappedKey, WrapError> {
        let sealed = aead::seal(&self.kek, &self.aad(purpose), key.expose_for_wrapping())
            .map_err(|e| WrapError::Permanent(e.to_string()))?;
        let mut blob = sealed.nonce.to_vec();
        blob.extend_from_slice(&sealed.ciphertext);
        Ok(WrappedKey {
            kek_id: self.kek_id.clone(),
            blob,
        })
    }
}

/// The key file opened for reading, without following a symbolic link, or
/// `None` if there is none.
pub(super) fn open_key_file(path: &Path) -> anyhow::Result<Option<std::fs::File>> {
    let mut opts = std::fs::OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use rustix::fs::OFlags;
        use std::os::unix::fs::OpenOptionsExt;
        // NONBLOCK: a FIFO planted in place of the key would otherwise
        // block the open until someone writes to it; it is refused below.
        let flags = (OFlags::NOFOLLOW | OFlags::NONBLOCK).bits();
        opts.custom_flags(i32::try_from(flags).expect("open(2) flags fit in an int"));
    }
    match opts.open(path) {
        Ok(file) => Ok(Some(file)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        #[cfg(unix)]
        Err(e) if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            anyhow::bail!(
                "the local key file {} is a symbolic link; it is not followed: \
                 put the key file itself there (mode 600)",
                path.display()
            )
        }
        Err(e) => Err(anyhow::anyhow!(
            "cannot open the local key file {}: {e}",
            path.display()
        )),
    }
}

/// Checks the opened key file (see [`check_opened`]) and reads the key.
pub(super) fn read_key_file(path: &Path, file: std::fs::File) -> anyhow::Result<KeyMaterial> {
    use std::io::Read;
    check_opened(path, &file)?;
    // 64 hex digits and a newline; anything longer is not a key file, and
    // the capacity is never outgrown, so no copy of the key is left behind
    // in a freed buffer.
    let mut text = Zeroizing::new(String::with_capacity(128));
    file.take(127)
        .read_to_string(&mut text)
        .map_err(|e| anyhow::anyhow!("cannot read the local key file {}: {e}", path.display()))?;
    let bytes = Zeroizing::new(hex::decode(text.trim()).map_err(|_| {
        anyhow::anyhow!(
            "the local key file {} is not 64 hex characters",
            path.display()
        )
    })?);
    KeyMaterial::from_slice(&bytes)
        .map_err(|_| anyhow::anyhow!("the local key file {} is not a 256-bit key", path.display()))
}

/// What the open handle is (fstat, not stat of the path): a regular file,
/// owned by the user running pii-vault, that no group or other user may
/// read or write.
#[cfg(unix)]
fn check_opened(path: &Path, file: &std::fs::File) -> anyhow::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = file.metadata().map_err(|e| {
        anyhow::anyhow!("cannot inspect the local key file {}: {e}", path.display())
    })?;
    if !meta.is_file() {
        anyhow::bail!(
            "the local key file {} is not a regular file",
            path.display()
        );
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "the local key file {} is readable or writable by others (mode {:o}); run `chmod 600 {}`",
            path.display(),
            mode & 0o777,
            path.display()
        );
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        anyhow::bail!(
            "the local key file {} belongs to user id {}, not to the user running pii-vault ({me}); \
             run `chown` on it, or run pii-vault as its owner",
            path.display(),
            meta.uid()
        );
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_opened(_: &Path, _: &std::fs::File) -> anyhow::Result<()> {
    Ok(())
}

/// Creates the key file (never over an existing file or link), writes the
/// key and makes both the file and its directory entry durable, so that a
/// crash right after the first keys are wrapped cannot lose the key that
/// wrapped them.
pub(super) fn write_new_key_file(dir: &Path, path: &Path, kek: &KeyMaterial) -> anyhow::Result<()> {
    let dir_existed = dir.is_dir();
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("cannot create the key directory {}: {e}", dir.display()))?;
    let mut opts = std::fs::OpenOptions::new();
    // create_new is O_CREAT | O_EXCL: it fails on any existing name,
    // a symbolic link included, and never follows one.
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .map_err(|e| anyhow::anyhow!("cannot create the local key file {}: {e}", path.display()))?;
    let text = Zeroizing::new(hex::encode(kek.expose_for_wrapping()));
    let written = f
        .write_all(text.as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all());
    written
        .map_err(|e| anyhow::anyhow!("cannot write the local key file {}: {e}", path.display()))?;
    sync_dir(dir)?;
    if !dir_existed {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

/// fsync of a directory, so that a new entry in it survives a crash.
#[cfg(unix)]
fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| anyhow::anyhow!("cannot sync the key directory {}: {e}", dir.display()))
}

#[cfg(not(unix))]
fn sync_dir(_: &Path) -> anyhow::Result<()> {
    Ok(())
}

#[async_trait]
impl KeyWrapper for LocalKek {
    fn kek_id(&self) -> String {
        self.kek_id.clone()
    }

    async fn wrap(&self, purpose: KeyPurpose, key: &KeyMaterial) -> Result<WrappedKey, WrapError> {
        LocalKek::wrap(self, purpose, key)
    }

    async fn follow(&self, kek_id: &str) -> Result<(), WrapError> {
        if kek_id == self.kek_id {
            Ok(())
        } else {
            Err(WrapError::WrongKek {
                expected: self.kek_id.clone(),
                found: kek_id.to_string(),
            })
        }
    }

    async fn generate(&self, purpose: KeyPurpose) -> Result<(KeyMaterial, WrappedKey), WrapError> {
        let key = KeyMaterial::generate();
        let wrapped = self.wrap(purpose, &key)?;
        Ok((key, wrapped))
    }

    async fn unwrap(
        &self,
        purpose: KeyPurpose,
        wrapped: &WrappedKey,
    ) -> Result<KeyMaterial, WrapError> {
        if wrapped.kek_id != self.kek_id {
            return Err(WrapError::WrongKek {
                expected: self.kek_id.clone(),
                found: wrapped.kek_id.clone(),
            });
        }
        if wrapped.blob.len() < NONCE_LEN {
            return Err(WrapError::Unwrap);
        }
        let (nonce, ct) = wrapped.blob.split_at(NONCE_LEN);
        let plain =
            aead::open(&self.kek, &self.aad(purpose), nonce, ct).map_err(|_| WrapError::Unwrap)?;
        KeyMaterial::from_slice(&plain)
    }

    async fn rewrap(
        &self,
        purpose: KeyPurpose,
        wrapped: &WrappedKey,
    ) -> Result<WrappedKey, WrapError> {
        let key = self.unwrap(purpose, wrapped).await?;
        self.wrap(purpose, &key)
    }

    async fn check(&self) -> Result<(), WrapError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wrap_round_trip_binds_purpose_and_file_mode() {
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::open_or_create(dir.path()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(kek.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let (key, wrapped) = kek.generate(KeyPurpose::Vault).await.unwrap();
        assert!(!wrapped
            .blob
            .windows(32)
            .any(|w| w == key.expose_for_wrapping()));
        let back = kek.unwrap(KeyPurpose::Vault, &wrapped).await.unwrap();
        assert_eq!(back.expose_for_wrapping(), key.expose_for_wrapping());
        assert!(matches!(
            kek.unwrap(KeyPurpose::Token, &wrapped).await,
            Err(WrapError::Unwrap)
        ));

        // Reopening finds the same KEK.
        let again = LocalKek::open_or_create(dir.path()).unwrap();
        assert_eq!(again.kek_id(), kek.kek_id());
        assert!(again.unwrap(KeyPurpose::Vault, &wrapped).await.is_ok());

        // Another KEK cannot unwrap it.
        let other = LocalKek::open_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        assert!(other.unwrap(KeyPurpose::Vault, &wrapped).await.is_err());
    }

    #[cfg(unix)]
    #[test]
    fn a_new_key_file_has_mode_600_and_reopens_to_the_same_key() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys"); // created on the way
        let kek = LocalKek::open_or_create(&keys).unwrap();
        let meta = std::fs::symlink_metadata(kek.path()).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        assert_eq!(meta.len(), 65, "64 hex digits and a newline");
        let again = LocalKek::open_or_create(&keys).unwrap();
        assert_eq!(again.kek_id(), kek.kek_id());
    }

    #[cfg(unix)]
    #[test]
    fn refuses_a_symlinked_key_file() {
        let dir = tempfile::tempdir().unwrap();
        // A valid key file elsewhere, mode 600: only the link is wrong.
        let real = LocalKek::open_or_create(&dir.path().join("elsewhere")).unwrap();
        let keys = dir.path().join("keys");
        std::fs::create_dir(&keys).unwrap();
        std::os::unix::fs::symlink(real.path(), keys.join(KEK_FILE)).unwrap();
        let err = LocalKek::open_or_create(&keys).err().unwrap().to_string();
        assert!(err.contains("symbolic link"), "{err}");
        let secret = std::fs::read_to_string(real.path()).unwrap();
        assert!(!err.contains(secret.trim()), "the error holds the key");

        // A dangling link is refused too, not replaced by a new key file
        // written wherever it points.
        let dangling = dir.path().join("dangling");
        std::fs::create_dir(&dangling).unwrap();
        let target = dir.path().join("not-there");
        std::os::unix::fs::symlink(&target, dangling.join(KEK_FILE)).unwrap();
        let err = LocalKek::open_or_create(&dangling)
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("symbolic link"), "{err}");
        assert!(!target.exists());
    }

    #[cfg(unix)]
    #[test]
    fn refuses_a_group_readable_key_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::open_or_create(dir.path()).unwrap();
        std::fs::set_permissions(kek.path(), std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = LocalKek::open_or_create(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("mode 640") && err.contains("chmod 600"),
            "{err}"
        );
        let secret = std::fs::read_to_string(kek.path()).unwrap();
        assert!(!err.contains(secret.trim()), "the error holds the key");
    }

    #[cfg(unix)]
    #[test]
    fn refuses_a_key_path_that_is_not_a_regular_file() {
        use std::os::unix::fs::DirBuilderExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir.path().join(KEK_FILE))
            .unwrap();
        let err = LocalKek::open_or_create(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn refuses_a_world_readable_key_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let kek = LocalKek::open_or_create(dir.path()).unwrap();
        std::fs::set_permissions(kek.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = LocalKek::open_or_create(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}
