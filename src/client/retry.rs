//! The per-file retry policy of `backup-client` (module docs of `cli.rs`,
//! "Policy"): which errors are retried and which end the file or the run, the
//! connection and identity kept across files ([`Session`]: reconnect, or
//! register and save the identity), and the sending of one file.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rsa::RsaPrivateKey;

use super::cli::{EXIT_CKSUM, EXIT_LOCAL, EXIT_NETWORK, EXIT_REFUSED};
use super::identity::{self, Identity};
use super::report::{Done, Failure, FileReport};
use super::run::report_for;
use super::ui::Ui;
use super::walk::Entry;
use super::{Client, ClientError, ClientOptions, PacketPlan, SendOutcome, UploadOptions};
use crate::protocol::{id_hex, parse_id_hex, Response};

/// How an error from the client library is handled.
enum Disposition {
    /// 1607, network failure, malformed reply: retry the file.
    Retry(Failure),
    /// Give up on this file.
    Fail(Failure),
}

fn classify(e: &ClientError) -> Disposition {
    let msg = e.to_string();
    match e {
        ClientError::Io(_) => Disposition::Retry(Failure {
            code: EXIT_NETWORK,
            status: if e.is_timeout() { "timeout" } else { "network_error" },
            message: msg,
        }),
        ClientError::Refused(Response::GeneralError) => {
            Disposition::Retry(Failure { code: EXIT_REFUSED, status: "server_error", message: msg })
        }
        ClientError::Protocol(_) => {
            Disposition::Retry(Failure { code: EXIT_REFUSED, status: "protocol_error", message: msg })
        }
        ClientError::Refused(_) => {
            Disposition::Fail(Failure { code: EXIT_REFUSED, status: "refused", message: msg })
        }
        ClientError::Crypto(_) => {
            Disposition::Fail(Failure { code: EXIT_REFUSED, status: "crypto_error", message: msg })
        }
        ClientError::Local(_) => Disposition::Fail(Failure::local(msg)),
        ClientError::FileChanged { .. } => {
            Disposition::Fail(Failure { code: EXIT_LOCAL, status: "file_changed", message: msg })
        }
    }
}

/// A session-level failure: it ends the run for all remaining files.
pub(super) struct Fatal(pub(super) Failure);

/// Connection + identity state across files.
pub(super) struct Session {
    pub(super) server: String,
    pub(super) name: String,
    pub(super) identity_path: PathBuf,
    pub(super) identity: Option<Identity>,
    /// Key generated for a registration not completed yet (kept across retries).
    pub(super) new_key: Option<RsaPrivateKey>,
    pub(super) key_bits: u32,
    /// The command line that registers again ([`REGISTER_AGAIN`](super::cli::REGISTER_AGAIN) or
    /// its legacy form), for hints.
    pub(super) register_again: &'static str,
    pub(super) client_opts: ClientOptions,
    pub(super) client: Option<Client>,
}

impl Session {
    /// A usable, keyed connection; sets one up if needed.
    fn ensure(&mut self, ui: &Ui) -> Result<&mut Client, ClientError> {
        let usable = self
            .client
            .as_ref()
            .is_some_and(|c| c.is_in_step() && c.aes_key().is_some() && !c.is_peer_closed());
        if !usable {
            self.client = None;
            let client = self.setup(ui)?;
            self.client = Some(client);
        }
        Ok(self.client.as_mut().expect("client set above"))
    }

    fn setup(&mut self, ui: &Ui) -> Result<Client, ClientError> {
        if self.identity.is_none() && self.new_key.is_none() {
            ui.info(&format!("generating a {}-bit RSA key", self.key_bits));
            let key = RsaPrivateKey::new(&mut rand::rngs::OsRng, self.key_bits as usize)
                .map_err(|e| ClientError::Crypto(format!("RSA key generation failed: {e}")))?;
            self.new_key = Some(key);
        }
        let mut client = Client::connect(self.server.as_str(), &self.client_opts)?;
        if let Some(ident) = &self.identity {
            client.reconnect(ident.id, &ident.name, &ident.key).map_err(|e| match e {
                // The server encrypted the session key with the public key it
                // holds for this id: ours is not its private half.
                ClientError::Crypto(m) => ClientError::Crypto(format!(
                    "{m}; the private key in {} does not match the key the server holds for {} (id {}): \
                     the operator can run `{}` on the server, then register again with `{}`",
                    self.identity_path.display(),
                    ident.name,
                    id_hex(&ident.id),
                    reset_key_command(&ident.name),
                    self.register_again
                )),
                e => e,
            })?;
            ui.info(&format!("reconnected as {} (id {})", ident.name, id_hex(&ident.id)));
            return Ok(client);
        }
        let id = client.register(&self.name)?;
        let key = self.new_key.as_ref().expect("key generated above");
        client.send_public_key(&self.name, key)?;
        let ident = Identity { name: self.name.clone(), id, key: key.clone() };
        // Checked before registering (run.rs), but the folder may have
        // changed since: then the key is lost, and uploading under an
        // identity nobody can use again would only hide that.
        if let Err(e) = identity::save_identity(&self.identity_path, &ident) {
            return Err(ClientError::local(
                e.kind(),
                format!(
                    "registered as {} (id {}) but could not save {}: {e}; nothing was uploaded. The server now \
                     holds this name with a key that is lost: run `{}` on the server to forget it, then run \
                     the client again with an identity path that can be written",
                    ident.name,
                    id_hex(&id),
                    self.identity_path.display(),
                    reset_key_command(&ident.name)
                ),
            ));
        }
        ui.info(&format!(
            "registered as {} (id {}); identity saved to {}",
            ident.name,
            id_hex(&id),
            self.identity_path.display()
        ));
        self.identity = Some(ident);
        self.new_key = None;
        Ok(client)
    }
}

/// The `backupd reset-key` command for the client `name`, as it is typed in
/// a POSIX shell: `name:` in front of a name that would be read as an id or
/// an option, single quotes around one that needs them.
pub(super) fn reset_key_command(name: &str) -> String {
    let spec = if parse_id_hex(name).is_some()
        || name.starts_with('-')
        || name.starts_with("id:")
        || name.starts_with("name:")
    {
        format!("name:{name}")
    } else {
        name.to_string()
    };
    let plain = spec.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-+=:,@%/".contains(&b));
    if plain {
        format!("backupd reset-key {spec}")
    } else {
        format!("backupd reset-key '{}'", spec.replace('\'', r"'\''"))
    }
}

/// Checks that need no server: the name and size can be sent.
fn precheck(e: &Entry, size: u64, opts: &UploadOptions) -> Result<(), Failure> {
    if e.name.is_empty() {
        return Err(Failure::local(format!("{}: no file name to send it under", e.path.display())));
    }
    super::name_field(&e.name).map_err(|err| Failure::local(format!("{}: {err}", e.path.display())))?;
    PacketPlan::new(size, opts.packet_size, opts.content_size)
        .map_err(|m| Failure::local(format!("{}: {m}", e.path.display())))?;
    Ok(())
}

fn session_failure(e: &ClientError, server: &str, name: &str) -> Disposition {
    match e {
        ClientError::Refused(Response::RegistrationFailed) => Disposition::Fail(Failure {
            code: EXIT_REFUSED,
            status: "name_taken",
            message: format!(
                "the server refused to register {name:?}: the name is already taken \
                 (choose another --name, or use the me.info of that user)"
            ),
        }),
        ClientError::Refused(Response::ReconnectDenied { .. }) => Disposition::Fail(Failure {
            code: EXIT_REFUSED,
            status: "reconnect_denied",
            message: format!(
                "the server denied reconnecting as {name:?} (it does not know this id and name, or has no key \
                 for it); use --register to register afresh"
            ),
        }),
        ClientError::Io(_) => Disposition::Retry(Failure {
            code: EXIT_NETWORK,
            status: if e.is_timeout() { "timeout" } else { "network_error" },
            message: format!("{server}: {e}"),
        }),
        _ => classify(e),
    }
}

/// Send one file (with the retry policy); `bytes_before` is what the run's
/// progress bar had reached before it.
pub(super) fn send_one(
    session: &mut Session,
    e: &Entry,
    size: u64,
    opts: &UploadOptions,
    retries: u32,
    ui: &Ui,
    bytes_before: u64,
) -> Result<FileReport, Fatal> {
    let start = Instant::now();
    // Time and rate count from the first byte of the file sent, not the
    // connection and identity set-up (key generation can take seconds).
    let mut upload_start: Option<Instant> = None;
    let mut report = report_for(e, Ok(Done::Verified));
    report.size = Some(size);
    if let Err(f) = precheck(e, size, opts) {
        report.result = Err(f);
        return Ok(report);
    }
    let mut tries = 0;
    let result = loop {
        let backoff = Duration::from_millis(500 * u64::from(tries + 1));
        let client = match session.ensure(ui) {
            Ok(c) => c,
            Err(err) => match session_failure(&err, &session.server, &session.name) {
                Disposition::Retry(f) if tries < retries => {
                    ui.info(&format!("{}; retrying in {:.1} s", f.message, backoff.as_secs_f64()));
                    tries += 1;
                    std::thread::sleep(backoff);
                    continue;
                }
                Disposition::Retry(f) | Disposition::Fail(f) => return Err(Fatal(f)),
            },
        };
        upload_start.get_or_insert_with(Instant::now);
        let err = match attempt(client, e, opts, ui, bytes_before, &mut report) {
            Ok(outcome) => break outcome,
            Err(err) => err,
        };
        if !client.is_in_step() || err.is_network() {
            session.client = None;
        }
        match classify(&err) {
            Disposition::Retry(f) if tries < retries => {
                ui.info(&format!(
                    "{}: {}; retrying in {:.1} s",
                    e.path.display(),
                    f.message,
                    backoff.as_secs_f64()
                ));
                tries += 1;
                std::thread::sleep(backoff);
            }
            Disposition::Retry(f) | Disposition::Fail(f) => break Err(f),
        }
    };
    report.elapsed = upload_start.unwrap_or(start).elapsed();
    report.result = result;
    if report.result.is_err() && report.attempts == 0 {
        report.attempts = tries + 1;
    }
    Ok(report)
}

/// One attempt at the file on `client` (its cksum retries included): how the
/// file ended, or the error that interrupted it (for the retry policy). The
/// checksums and attempts go into `report`.
fn attempt(
    client: &mut Client,
    e: &Entry,
    opts: &UploadOptions,
    ui: &Ui,
    bytes_before: u64,
    report: &mut FileReport,
) -> Result<Result<Done, Failure>, ClientError> {
    let mut progress = |n: u64| {
        if let Some(b) = &*ui.bar.borrow() {
            b.set_position(bytes_before + n);
        }
    };
    // Only a 1603 of this file counts (not one of an earlier file on this connection).
    let earlier = client.last_upload().cloned();
    let r = client.send_file(&e.name, &e.path, opts, &mut progress);
    if let Some(up) = client.last_upload().filter(|&up| Some(up) != earlier.as_ref()) {
        report.cksum = Some(up.local_cksum);
        report.server_cksum = Some(up.server_cksum);
    }
    Ok(match r? {
        SendOutcome::Verified { attempts, cksum } => {
            report.attempts = attempts;
            report.cksum = Some(cksum);
            report.server_cksum = Some(cksum);
            Ok(Done::Verified)
        }
        SendOutcome::CksumMismatch { attempts } => {
            report.attempts = attempts;
            Err(Failure {
                code: EXIT_CKSUM,
                status: "cksum_mismatch",
                message: format!("cksum still wrong after {attempts} attempts; upload aborted (1031)"),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::reset_key_command;

    #[test]
    fn reset_key_command_is_typed_as_is() {
        assert_eq!(reset_key_command("alice"), "backupd reset-key alice");
        assert_eq!(reset_key_command("a.b-c_d@h"), "backupd reset-key a.b-c_d@h");
        assert_eq!(reset_key_command("Jo Doe"), "backupd reset-key 'Jo Doe'");
        assert_eq!(reset_key_command("it's"), r"backupd reset-key 'it'\''s'");
        assert_eq!(reset_key_command("-x"), "backupd reset-key name:-x");
        assert_eq!(reset_key_command("id:1"), "backupd reset-key name:id:1");
        assert_eq!(reset_key_command("name:1"), "backupd reset-key name:name:1");
        let hex = "0123456789abcdef0123456789abcdef";
        assert_eq!(reset_key_command(hex), format!("backupd reset-key name:{hex}"));
    }
}
