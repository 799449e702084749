//! Host tests of the NBD engine against a scripted client.
