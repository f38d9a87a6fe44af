//! `backup-client`: send encrypted backups to a protocol-v3 server.
//! All the logic lives in `backupd::client::cli`; see `backup-client --help`.

fn main() {
    std::process::exit(backupd::client::cli::main());
}
