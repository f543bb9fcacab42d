#!/bin/sh
# Guest script: N rounds (default 6) of fio randwrite with crc32c verify on
# /dev/vda, 32 MiB each at a rotating offset; prints "ITER i rc=..." per
# round so a host script can tell how far the guest got. Exit 1 if any round
# failed.
N=${N:-6}
i=1
fail=0
while [ "$i" -le "$N" ]; do
    fio --name=l --filename=/dev/vda --ioengine=libaio --iodepth=8 --direct=1 --rw=randwrite \
        --bssplit=4k/50:64k/50 --size=32m --offset=$(( (i % 4) * 48 ))m --numjobs=1 \
        --verify=crc32c --verify_fatal=1 --do_verify=1 --randseed="$i" > /tmp/fio.out 2>&1
    rc=$?
    echo "ITER $i rc=$rc"
    if [ "$rc" != 0 ]; then
        grep -E "verify|err" /tmp/fio.out | head -5
        fail=1
    fi
    i=$((i + 1))
done
sync
exit $fail
