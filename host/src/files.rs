//! `wasi:filesystem` as Shoal's guests get it: wasmtime-wasi's, except that
//! a guest opens regular files and directories only.
//!
//! A guest's files are written by whoever built its image, or its pod's
//! volumes: a character device (`/dev/urandom`, `/dev/kmsg`), a block
//! device of the node's disk, a FIFO that never gets a writer or a tty may
//! sit at any path. wasmtime-wasi opens whatever a path names, with the
//! host's own rights, and a FIFO's open blocks the host thread doing it for
//! as long as no one writes. So every `open-at` first asks what the path is
//! (`stat-at`, which opens nothing: an `O_PATH` look-up) and refuses
//! anything but a regular file or a directory with `access`, before the
//! open happens. A guest cannot make special files itself (WASI has no
//! `mknod`), and a container's rootfs is read-only to it, so what the check
//! saw is what the open gets; the node host also mounts every rootfs
//! `nodev` (see the node crate), so a device in an image could not be
//! opened as one even then.
//!
//! Every other call goes to wasmtime-wasi as it is. Hand-written because
//! wasmtime-wasi has no hook on what an open may reach; WASI 0.2's
//! interface is re-linked over wasmtime-wasi's own ([`add_to_linker`]),
//! and WASI 0.3's `open-at` over its one function ([`add_p3_to_linker`]:
//! the rest of 0.3's interface is wasmtime-wasi's, whose descriptors and
//! preopens are the same as 0.2's).

use wasmtime::component::{HasData, Linker, Resource};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::filesystem::{WasiFilesystemCtxView, WasiFilesystemView as _};
use wasmtime_wasi::p2::bindings::filesystem::types::{
    self, DescriptorType, ErrorCode, HostDescriptor, HostDirectoryEntryStream,
};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, FsError, FsResult};

/// The filesystem interface with opens limited to ordinary files.
pub struct OrdinaryFiles;

impl HasData for OrdinaryFiles {
    type Data<'a> = OrdinaryFilesView<'a>;
}

/// A store's filesystem state, seen through [`OrdinaryFiles`].
pub struct OrdinaryFilesView<'a>(WasiFilesystemCtxView<'a>);

/// Replace `wasi:filesystem/types` in `linker` (which has WASI 0.2 from
/// wasmtime-wasi already) by [`OrdinaryFiles`].
pub fn add_to_linker<T: WasiView>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let linked = types::add_to_linker::<T, OrdinaryFiles>(linker, |state| OrdinaryFilesView(state.filesystem()));
    linker.allow_shadowing(false);
    linked
}

/// `wasi:filesystem@0.3.0` in `linker`: wasmtime-wasi's, its
/// `descriptor.open-at` replaced by one that first asks what the path is
/// and refuses what [`may_open_p3`] refuses with `access`, as for 0.2.
pub fn add_p3_to_linker<T: WasiView + 'static>(linker: &mut Linker<T>) -> wasmtime::Result<()> {
    use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystem};
    use wasmtime_wasi::p3::bindings::filesystem::types::{
        DescriptorFlags, ErrorCode, HostDescriptorWithStore, OpenFlags, PathFlags,
    };
    type Args = (Resource<Descriptor>, PathFlags, String, OpenFlags, DescriptorFlags);

    wasmtime_wasi::p3::filesystem::add_to_linker(linker)?;
    linker.allow_shadowing(true);
    let mut types = linker.instance("wasi:filesystem/types@0.3.0")?;
    let linked = types.func_wrap_concurrent(
        "[method]descriptor.open-at",
        |accessor: &wasmtime::component::Accessor<T>, (fd, path_flags, path, oflags, flags): Args| {
            Box::pin(async move {
                let files = accessor.with_getter::<WasiFilesystem>(|state: &mut T| state.filesystem());
                let again = Resource::new_borrow(fd.rep());
                let kind = match WasiFilesystem::stat_at(&files, again, path_flags, path.clone()).await {
                    Ok(stat) => Some(stat.type_),
                    Err(err)
                        if oflags.contains(OpenFlags::CREATE)
                            && err.downcast_ref().is_some_and(|code| matches!(code, ErrorCode::NoEntry)) =>
                    {
                        None
                    }
                    Err(err) => return Ok((Err(err.downcast()?),)),
                };
                if !may_open_p3(kind.as_ref()) {
                    tracing::debug!(path, kind = ?kind, "a guest's open of a special file was refused");
                    return Ok((Err(ErrorCode::Access),));
                }
                match WasiFilesystem::open_at(&files, fd, path_flags, path, oflags, flags).await {
                    Ok(opened) => Ok((Ok(opened),)),
                    Err(err) => Ok((Err(err.downcast()?),)),
                }
            })
        },
    );
    linker.allow_shadowing(false);
    linked
}

/// [`may_open`] for WASI 0.3's descriptor types.
pub fn may_open_p3(kind: Option<&wasmtime_wasi::p3::bindings::filesystem::types::DescriptorType>) -> bool {
    use wasmtime_wasi::p3::bindings::filesystem::types::DescriptorType as Kind;
    matches!(kind, None | Some(Kind::RegularFile | Kind::Directory | Kind::SymbolicLink))
}

/// Whether a guest may open a file of type `kind` (`None`: it does not
/// exist, and is being created as a regular file).
pub fn may_open(kind: Option<DescriptorType>) -> bool {
    matches!(kind, None | Some(DescriptorType::RegularFile | DescriptorType::Directory | DescriptorType::SymbolicLink))
}

/// A second handle of the guest's borrowed descriptor `fd`, for a call
/// before the one it was passed for.
fn again(fd: &Resource<types::Descriptor>) -> Resource<types::Descriptor> {
    Resource::new_borrow(fd.rep())
}

impl types::Host for OrdinaryFilesView<'_> {
    fn convert_error_code(&mut self, err: FsError) -> wasmtime::Result<ErrorCode> {
        types::Host::convert_error_code(&mut self.0, err)
    }

    fn filesystem_error_code(&mut self, err: Resource<wasmtime::Error>) -> wasmtime::Result<Option<ErrorCode>> {
        types::Host::filesystem_error_code(&mut self.0, err)
    }
}

impl HostDescriptor for OrdinaryFilesView<'_> {
    async fn open_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        oflags: types::OpenFlags,
        flags: types::DescriptorFlags,
    ) -> FsResult<Resource<types::Descriptor>> {
        let kind = match HostDescriptor::stat_at(&mut self.0, again(&fd), path_flags, path.clone()).await {
            Ok(stat) => Some(stat.type_),
            // Created by this open: a regular file.
            Err(err) if oflags.contains(types::OpenFlags::CREATE) && is_no_entry(&err) => None,
            Err(err) => return Err(err),
        };
        if !may_open(kind) {
            tracing::debug!(path, kind = ?kind, "a guest's open of a special file was refused");
            return Err(ErrorCode::Access.into());
        }
        HostDescriptor::open_at(&mut self.0, fd, path_flags, path, oflags, flags).await
    }

    async fn advise(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
        len: types::Filesize,
        advice: types::Advice,
    ) -> FsResult<()> {
        HostDescriptor::advise(&mut self.0, fd, offset, len, advice).await
    }

    async fn sync_data(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        HostDescriptor::sync_data(&mut self.0, fd).await
    }

    async fn get_flags(&mut self, fd: Resource<types::Descriptor>) -> FsResult<types::DescriptorFlags> {
        HostDescriptor::get_flags(&mut self.0, fd).await
    }

    async fn get_type(&mut self, fd: Resource<types::Descriptor>) -> FsResult<types::DescriptorType> {
        HostDescriptor::get_type(&mut self.0, fd).await
    }

    async fn set_size(&mut self, fd: Resource<types::Descriptor>, size: types::Filesize) -> FsResult<()> {
        HostDescriptor::set_size(&mut self.0, fd, size).await
    }

    async fn set_times(
        &mut self,
        fd: Resource<types::Descriptor>,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        HostDescriptor::set_times(&mut self.0, fd, atim, mtim).await
    }

    async fn read(
        &mut self,
        fd: Resource<types::Descriptor>,
        len: types::Filesize,
        offset: types::Filesize,
    ) -> FsResult<(Vec<u8>, bool)> {
        HostDescriptor::read(&mut self.0, fd, len, offset).await
    }

    async fn write(
        &mut self,
        fd: Resource<types::Descriptor>,
        buf: Vec<u8>,
        offset: types::Filesize,
    ) -> FsResult<types::Filesize> {
        HostDescriptor::write(&mut self.0, fd, buf, offset).await
    }

    async fn read_directory(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<Resource<types::DirectoryEntryStream>> {
        HostDescriptor::read_directory(&mut self.0, fd).await
    }

    async fn sync(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        HostDescriptor::sync(&mut self.0, fd).await
    }

    async fn create_directory_at(&mut self, fd: Resource<types::Descriptor>, path: String) -> FsResult<()> {
        HostDescriptor::create_directory_at(&mut self.0, fd, path).await
    }

    async fn stat(&mut self, fd: Resource<types::Descriptor>) -> FsResult<types::DescriptorStat> {
        HostDescriptor::stat(&mut self.0, fd).await
    }

    async fn stat_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::DescriptorStat> {
        HostDescriptor::stat_at(&mut self.0, fd, path_flags, path).await
    }

    async fn set_times_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        HostDescriptor::set_times_at(&mut self.0, fd, path_flags, path, atim, mtim).await
    }

    async fn link_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        old_path_flags: types::PathFlags,
        old_path: String,
        new_descriptor: Resource<types::Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        HostDescriptor::link_at(&mut self.0, fd, old_path_flags, old_path, new_descriptor, new_path).await
    }

    fn drop(&mut self, fd: Resource<types::Descriptor>) -> wasmtime::Result<()> {
        HostDescriptor::drop(&mut self.0, fd)
    }

    async fn readlink_at(&mut self, fd: Resource<types::Descriptor>, path: String) -> FsResult<String> {
        HostDescriptor::readlink_at(&mut self.0, fd, path).await
    }

    async fn remove_directory_at(&mut self, fd: Resource<types::Descriptor>, path: String) -> FsResult<()> {
        HostDescriptor::remove_directory_at(&mut self.0, fd, path).await
    }

    async fn rename_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        old_path: String,
        new_fd: Resource<types::Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        HostDescriptor::rename_at(&mut self.0, fd, old_path, new_fd, new_path).await
    }

    async fn symlink_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        src_path: String,
        dest_path: String,
    ) -> FsResult<()> {
        HostDescriptor::symlink_at(&mut self.0, fd, src_path, dest_path).await
    }

    async fn unlink_file_at(&mut self, fd: Resource<types::Descriptor>, path: String) -> FsResult<()> {
        HostDescriptor::unlink_file_at(&mut self.0, fd, path).await
    }

    fn read_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynInputStream>> {
        HostDescriptor::read_via_stream(&mut self.0, fd, offset)
    }

    fn write_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynOutputStream>> {
        HostDescriptor::write_via_stream(&mut self.0, fd, offset)
    }

    fn append_via_stream(&mut self, fd: Resource<types::Descriptor>) -> FsResult<Resource<DynOutputStream>> {
        HostDescriptor::append_via_stream(&mut self.0, fd)
    }

    async fn is_same_object(
        &mut self,
        a: Resource<types::Descriptor>,
        b: Resource<types::Descriptor>,
    ) -> wasmtime::Result<bool> {
        HostDescriptor::is_same_object(&mut self.0, a, b).await
    }

    async fn metadata_hash(&mut self, fd: Resource<types::Descriptor>) -> FsResult<types::MetadataHashValue> {
        HostDescriptor::metadata_hash(&mut self.0, fd).await
    }

    async fn metadata_hash_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::MetadataHashValue> {
        HostDescriptor::metadata_hash_at(&mut self.0, fd, path_flags, path).await
    }
}

impl HostDirectoryEntryStream for OrdinaryFilesView<'_> {
    async fn read_directory_entry(
        &mut self,
        stream: Resource<types::DirectoryEntryStream>,
    ) -> FsResult<Option<types::DirectoryEntry>> {
        HostDirectoryEntryStream::read_directory_entry(&mut self.0, stream).await
    }

    fn drop(&mut self, stream: Resource<types::DirectoryEntryStream>) -> wasmtime::Result<()> {
        HostDirectoryEntryStream::drop(&mut self.0, stream)
    }
}

/// Whether `err` is the guest-facing "no such file".
fn is_no_entry(err: &FsError) -> bool {
    err.downcast_ref().is_some_and(|code: &ErrorCode| matches!(code, ErrorCode::NoEntry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_directories_and_new_files_may_be_opened() {
        for allowed in [None, Some(DescriptorType::RegularFile), Some(DescriptorType::Directory)] {
            assert!(may_open(allowed), "{allowed:?}");
        }
        for refused in [
            DescriptorType::CharacterDevice,
            DescriptorType::BlockDevice,
            DescriptorType::Fifo,
            DescriptorType::Socket,
            DescriptorType::Unknown,
        ] {
            assert!(!may_open(Some(refused)), "{refused:?}");
        }
    }

    #[test]
    fn wasi_0_3_opens_only_regular_files_directories_and_new_files_too() {
        use wasmtime_wasi::p3::bindings::filesystem::types::DescriptorType as Kind;
        for allowed in [None, Some(Kind::RegularFile), Some(Kind::Directory)] {
            assert!(may_open_p3(allowed.as_ref()), "{allowed:?}");
        }
        for refused in [
            Kind::CharacterDevice,
            Kind::BlockDevice,
            Kind::Fifo,
            Kind::Socket,
            Kind::Other(None),
            Kind::Other(Some("door".into())),
        ] {
            assert!(!may_open_p3(Some(&refused)), "{refused:?}");
        }
    }
}
