package hashring_test

import (
	"fmt"

	"github.com/kvd/kvd/hashring"
)

func Example() {
	// Data shards 1..16; shard 0, the meta shard, is not on the ring.
	shards := make([]uint64, 16)
	for i := range shards {
		shards[i] = uint64(i + 1)
	}
	r, err := hashring.New(shards, hashring.DefaultVnodes)
	if err != nil {
		fmt.Println(err)
		return
	}
	// Keys sharing a hash tag land in the same shard.
	fmt.Println(r.Shard([]byte("{user1}.profile")) == r.Shard([]byte("{user1}.cart")))
	fmt.Printf("%s\n", hashring.HashTag([]byte("{user1}.cart")))
	fmt.Println(r.Shard([]byte("kvd")))

	_, err = hashring.New([]uint64{1, 1}, hashring.DefaultVnodes)
	fmt.Println(err)
	// Output:
	// true
	// user1
	// 7
	// hashring: duplicate shard id: 1
}
