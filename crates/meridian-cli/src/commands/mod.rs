pub mod chaos;
pub mod deploy;
pub mod dev;
pub mod roles;
pub mod status;
