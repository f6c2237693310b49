pub mod certs;
pub mod chaos;
pub mod deploy;
pub mod dev;
pub mod kv;
pub mod roles;
pub mod status;
pub mod tokens;
