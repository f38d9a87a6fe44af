pub mod client;
pub mod config;
pub mod crypto;
pub mod datadir;
pub mod protocol;
pub mod server;
pub mod worker;
