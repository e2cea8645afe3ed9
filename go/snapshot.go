package oxcow

import (
	"time"

	"oxcow.dev/oxcow/internal/capi"
)

// Snapshot describes one internal snapshot, as `qemu-img snapshot -l` lists it.
type Snapshot struct {
	ID          string    // unique id, e.g. "1"
	Name        string    // name (tag); names need not be unique
	Date        time.Time // creation time
	VMClock     time.Duration
	VMStateSize uint64 // bytes of saved VM state (0 for disk-only snapshots)
	DiskSize    uint64 // virtual size when the snapshot was taken (0 if not recorded)
	Icount      uint64 // instruction counter at creation
	HasIcount   bool   // whether Icount was recorded
}

// Snapshots lists the image's internal snapshots in table order.
func (img *Image) Snapshots() ([]Snapshot, error) {
	h, err := img.acquire("snapshot list")
	if err != nil {
		return nil, err
	}
	defer img.mu.RUnlock()
	list, cerr := capi.SnapshotList(h)
	if cerr != nil {
		return nil, wrap("snapshot list", img.path, cerr)
	}
	out := make([]Snapshot, len(list))
	for i, s := range list {
		out[i] = Snapshot{
			ID:          s.ID,
			Name:        s.Name,
			Date:        time.Unix(int64(s.DateSec), int64(s.DateNsec)),
			VMClock:     time.Duration(s.VMClockNsec),
			VMStateSize: s.VMStateSize,
			DiskSize:    s.DiskSize,
			Icount:      s.Icount,
			HasIcount:   s.Flags&capi.SnapshotHasIcount != 0,
		}
	}
	return out, nil
}

// CreateSnapshot takes an internal snapshot of the current disk state named name, like
// `qemu-img snapshot -c` (the next numeric id, the current time). Writers on other goroutines
// wait for the switch; readers go on. EROFS on a read-only image, EINVAL for an empty name
// or one over 255 bytes.
func (img *Image) CreateSnapshot(name string) error {
	h, err := img.acquire("snapshot create")
	if err != nil {
		return err
	}
	defer img.mu.RUnlock()
	return wrap("snapshot create", img.path, capi.SnapshotCreate(h, name))
}

// ApplySnapshot reverts the disk to the snapshot whose id, else whose name, is nameOrID,
// like `qemu-img snapshot -a`; a snapshot of another disk size resizes the image to it
// first, as QEMU does (Size follows). ENOENT when there is none; EBUSY when the image has
// persistent bitmaps (QEMU refuses those too); ENOTSUP when the snapshot's L1 table is
// longer than the image's.
func (img *Image) ApplySnapshot(nameOrID string) error {
	h, err := img.acquire("snapshot apply")
	if err != nil {
		return err
	}
	defer img.mu.RUnlock()
	// Serialised with resizes: the apply may resize, and the cached size must follow.
	img.resizeMu.Lock()
	defer img.resizeMu.Unlock()
	if cerr := capi.SnapshotApply(h, nameOrID); cerr != nil {
		return wrap("snapshot apply", img.path, cerr)
	}
	info, cerr := capi.GetInfo(h)
	if cerr != nil {
		return wrap("snapshot apply", img.path, cerr)
	}
	img.size.Store(int64(info.VirtualSize))
	return nil
}

// DeleteSnapshot deletes the snapshot whose id, else whose name, is nameOrID, like
// `qemu-img snapshot -d`. ENOENT when there is none.
func (img *Image) DeleteSnapshot(nameOrID string) error {
	h, err := img.acquire("snapshot delete")
	if err != nil {
		return err
	}
	defer img.mu.RUnlock()
	return wrap("snapshot delete", img.path, capi.SnapshotDelete(h, nameOrID))
}
