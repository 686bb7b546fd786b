//! The storage controllers: the PersistentVolume binder ([`persistentvolume`]) and the
//! built-in local-path provisioner ([`localpath`]).

pub mod localpath;
pub mod persistentvolume;
