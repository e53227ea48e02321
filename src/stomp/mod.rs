//! The STOMP 1.2 protocol: wire format ([`frame`]) and meaning ([`command`]).

pub mod command;
pub mod frame;
