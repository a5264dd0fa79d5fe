package storage

import (
	"strings"
	"testing"

	bolt "go.etcd.io/bbolt"
)

// TestFutureLayoutRefused: a file a newer release wrote (a layout above
// this code's) is refused, untouched, in one line that names the file,
// both layouts and what to do.
func TestFutureLayoutRefused(t *testing.T) {
	e, path := openTest(t, Options{NoSync: true})
	_ = e.Close()
	setLayout := func(v uint64) {
		db, err := bolt.Open(path, 0o600, nil)
		if err != nil {
			t.Fatal(err)
		}
		defer db.Close()
		if err := db.Update(func(tx *bolt.Tx) error { return tx.Bucket(bucketNode).Put(keyLayout, u64(v)) }); err != nil {
			t.Fatal(err)
		}
	}
	setLayout(99)
	_, err := Open(path, Options{NoSync: true})
	mustIs(t, err, ErrLayout)
	msg := err.Error()
	for _, want := range []string{path + " has layout 99", "newer than layout 5", "run that release or a later one"} {
		if !strings.Contains(msg, want) {
			t.Errorf("error %q does not say %q", msg, want)
		}
	}
	if strings.Contains(msg, "\n") || strings.Count(msg, path) != 1 {
		t.Errorf("error %q is not one line naming the file once", msg)
	}
	db, err := bolt.Open(path, 0o600, &bolt.Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if err := db.View(func(tx *bolt.Tx) error {
		if v, _ := decodeU64(tx.Bucket(bucketNode).Get(keyLayout)); v != 99 {
			t.Errorf("the refused file's layout is now %d", v)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}
