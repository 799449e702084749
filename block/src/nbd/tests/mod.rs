//! Host tests of the NBD engine against a scripted client ([`peer`]):
//! every handshake path ([`handshake`]), every command and reply form
//! ([`commands`]), every bad-client case of `shared/reference/nbd.md`
//! ([`bad_client`]) and a seeded fuzz over input bytes ([`fuzz`]).

mod bad_client;
mod client;
mod client_node;
mod commands;
mod fuzz;
mod handshake;
pub(crate) mod peer;
