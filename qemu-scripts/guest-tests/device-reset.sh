#!/bin/sh
# Guest test: the driver resets the device under data, as a guest reboot or a
# driver reload does. Each of N rounds (default 3) writes a region with fio
# (crc32c verify, libaio QD8), then unbinds the virtio_blk driver from the
# device (a virtio reset: QEMU stops the vhost-user queues with
# GET_VRING_BASE) and binds it again (the queues start anew from index 0 with
# new rings), then re-reads and checks the region written, and every earlier
# region, through the new driver instance. The even rounds reset the device
# while a second fio job is writing, so requests are in flight when the
# driver goes away; that job may fail (its disk is removed under it), and
# only the data of completed writes is checked.
set -eu
N=${N:-3}
REGION_MB=${REGION_MB:-16}
dev_name=vda

virtio_of() {
    basename "$(readlink -f /sys/block/$dev_name/device)"
}

wait_dev() {
    i=0
    while [ ! -b /dev/$dev_name ] && [ $i -lt 200 ]; do
        usleep 50000
        i=$((i + 1))
    done
    [ -b /dev/$dev_name ] || { echo "device-reset: /dev/$dev_name did not come back"; exit 1; }
}

job() {
    # $1 round, $2 extra fio options
    echo "--name=r$1 --filename=/dev/$dev_name --ioengine=libaio --iodepth=8 --direct=1 \
--bssplit=4k/50:64k/30:16k/20 --size=${REGION_MB}m --offset=$(( ($1 - 1) * REGION_MB ))m \
--verify=crc32c --verify_fatal=1 --randseed=$1 $2"
}

[ -b /dev/$dev_name ] || { echo "device-reset: no /dev/$dev_name"; exit 1; }
drv=/sys/bus/virtio/drivers/virtio_blk
r=1
while [ "$r" -le "$N" ]; do
    # shellcheck disable=SC2046
    fio $(job "$r" "--rw=randwrite --do_verify=1") >/tmp/w.out 2>&1 || {
        cat /tmp/w.out
        echo "device-reset: round $r write+verify failed"
        exit 1
    }
    v=$(virtio_of)
    busy=""
    if [ $((r % 2)) = 0 ]; then
        # Writes in flight at the reset, into the region after this round's
        # (checked by no one: only the driver's reset is under test here).
        fio --name=busy --filename=/dev/$dev_name --ioengine=libaio --iodepth=16 --direct=1 \
            --rw=randwrite --bs=4k --size=${REGION_MB}m --offset=$(( N * REGION_MB ))m \
            --time_based --runtime=30 >/tmp/busy.out 2>&1 &
        busy=$!
        sleep 1
    fi
    echo "$v" >"$drv/unbind"
    [ ! -b /dev/$dev_name ] || { echo "device-reset: /dev/$dev_name still there after unbind"; exit 1; }
    [ -z "$busy" ] || wait "$busy" || true
    echo "$v" >"$drv/bind"
    wait_dev
    echo "device-reset: round $r: $v reset"
    k=1
    while [ "$k" -le "$r" ]; do
        # shellcheck disable=SC2046
        fio $(job "$k" "--rw=randwrite --verify_only") >/tmp/v.out 2>&1 || {
            cat /tmp/v.out
            echo "device-reset: round $r: region $k does not verify after the reset"
            exit 1
        }
        k=$((k + 1))
    done
    r=$((r + 1))
done
echo "device-reset: OK ($N resets)"
